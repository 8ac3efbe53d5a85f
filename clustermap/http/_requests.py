"""``clustermap.http.Session``: a ``requests.Session`` that sends service names to picked nodes."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from requests.cookies import extract_cookies_to_jar

import clustermap
from clustermap.client import ClusterMap
from clustermap.errors import ClusterMapError, UnknownService
from clustermap.feedback.calls import Call
from clustermap.feedback.retries import Attempts, Outcome
from clustermap.http._policy import ATTEMPT_HEADER, Failure, Policy, Target, rewrite, target_of

__all__ = ["NodeAdapter", "Session"]

KeyOption = str | bytes | Callable[[requests.PreparedRequest], str | bytes | None] | None

_TLS_NAME = "_clustermap_tls_name"


class NodeAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` that verifies TLS against the service's name, not the node address.

    The Session marks each request it sends to a node with the name to verify; this adapter
    passes it to urllib3 as ``server_hostname`` (SNI and certificate check) and
    ``assert_hostname``. Its pools are keyed by that name too, so two services on one node
    never share a TLS connection. Mount a subclass of it to customise the adapter.
    """

    def build_connection_pool_key_attributes(
        self,
        request: requests.PreparedRequest,
        verify: bool | str,
        cert: str | tuple[str, str] | None = None,
    ) -> Any:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        kwargs: dict[str, Any] = dict(pool_kwargs)
        name = getattr(request, _TLS_NAME, None)
        if name and host_params.get("scheme") == "https":
            kwargs["server_hostname"] = name
            kwargs["assert_hostname"] = name
        return host_params, kwargs


def _failure(exc: requests.RequestException) -> Failure:
    """How a requests error failed: could it have reached the node at all?"""
    if isinstance(exc, requests.ConnectTimeout):
        return Failure.CONNECT
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(
        reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError
    ):
        return Failure.CONNECT
    if isinstance(exc, requests.Timeout):
        return Failure.TIMEOUT
    return Failure.RESET


class Session(requests.Session):
    """A ``requests.Session`` whose URLs may name services: ``s.get("http://user-svc/x")``.

    A host that is a service in the map goes to a node picked for the request (``key``: a fixed
    consistent-hashing key or a callable of the prepared request; ``strategy``; ``subset``);
    any other host goes out unchanged. The Host header keeps the service name, TLS verifies the
    service name (or ``tls_server_name``), redirects to the service go through the map again.
    Each attempt is a :meth:`ClusterMap.call`; failures are retried on other nodes per
    ``policy`` (:class:`clustermap.http.Policy`) within the machine's retry budget. The last
    error carries ``.tried`` (:class:`clustermap.http.RequestFailed`). See docs/http.md.

    Connection pools belong to the process that made them: after a fork the child starts with
    fresh ones (the parent's sockets are left to the parent).
    """

    def __init__(
        self,
        map: ClusterMap | None = None,
        *,
        key: KeyOption = None,
        strategy: str | None = None,
        subset: Mapping[str, str] | None = None,
        policy: Policy | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        super().__init__()
        self.map: ClusterMap = map if map is not None else clustermap._default
        self.key = key
        self.strategy = strategy
        self.subset = dict(subset) if subset else None
        self.policy = policy or Policy()
        self.tls_server_name = tls_server_name
        self.mount("https://", NodeAdapter())
        self.mount("http://", NodeAdapter())
        self._pid = os.getpid()

    # -- routing -------------------------------------------------------------------------------

    def _is_service(self, host: str) -> bool:
        try:
            self.map.service(host)
        except UnknownService:
            return False
        except ClusterMapError:  # no region (yet), or a corrupt one: nothing is a service
            return False
        return True

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if self._pid != os.getpid():
            self._renew_pools()
        target = target_of(request.url or "", self._is_service, self.tls_server_name)
        if target is None:
            return super().send(request, **kwargs)
        allow_redirects = kwargs.pop("allow_redirects", True)
        response = self._send_to_service(request, target, kwargs)
        if allow_redirects:  # as requests.Session.send does; each hop comes back through send
            history = list(self.resolve_redirects(response, request, **kwargs))
            if history:
                history.insert(0, response)
                response = history.pop()
                response.history = history
        return response

    def _send_to_service(
        self, request: requests.PreparedRequest, target: Target, kwargs: dict[str, Any]
    ) -> requests.Response:
        key = self.key(request) if callable(self.key) else self.key
        policy = self.policy
        method = request.method or "GET"
        replayable = request.body is None or isinstance(request.body, bytes | str)
        attempts = Attempts(
            self.map, target.service, key, self.strategy, self.subset, policy.budget
        )

        def attempt(call: Call) -> Outcome[requests.Response]:
            sent = request.copy()
            sent.url = rewrite(request.url or "", call.node)
            sent.headers["Host"] = target.host_header
            sent.headers[ATTEMPT_HEADER] = str(attempts.retries + 1)
            setattr(sent, _TLS_NAME, target.tls_name)
            with call:
                try:
                    response = super(Session, self).send(sent, allow_redirects=False, **kwargs)
                except requests.RequestException as exc:
                    call.mark_failed()
                    retry = policy.may_retry(_failure(exc), method, replayable, attempts.retries)
                    return Outcome(error=exc, retry=retry)
                if policy.is_failure(response.status_code):
                    call.mark_failed()
            retry = response.status_code in policy.retry_statuses and policy.may_retry(
                Failure.STATUS, method, replayable, attempts.retries
            )
            return Outcome(response, retry=retry)

        response = attempts.run(attempt, policy.backoff, requests.Response.close)
        return self._as_service(response, request)

    def _as_service(
        self, response: requests.Response, request: requests.PreparedRequest
    ) -> requests.Response:
        """The response as the caller asked for it: its URL names the service, not the node, so
        a relative redirect resolves to the service (through the map again) and requests keeps
        an Authorization header on a redirect back to the same service; its cookies are the
        service's."""
        response.url = request.url or response.url
        response.request = request
        if response.raw is not None and getattr(response.raw, "_original_response", None):
            extract_cookies_to_jar(self.cookies, request, response.raw)  # type: ignore[no-untyped-call]
        return response

    def _renew_pools(self) -> None:
        """In a forked child: new pools for every adapter; the parent's stay the parent's."""
        self._pid = os.getpid()
        for adapter in self.adapters.values():
            if isinstance(adapter, HTTPAdapter):
                pool: Any = adapter  # the sizes HTTPAdapter.__init__ kept
                adapter.init_poolmanager(
                    pool._pool_connections, pool._pool_maxsize, block=pool._pool_block
                )
                adapter.proxy_manager = {}
