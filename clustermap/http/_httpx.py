"""``clustermap.http.Transport`` / ``AsyncTransport``: httpx transports that send service names
to picked nodes, wrapping ``httpx.HTTPTransport`` / ``httpx.AsyncHTTPTransport``.

The pick reads shared memory only (no I/O, no lock held across an ``await``), so the async
transport never blocks the event loop; its one wait, the backoff before a retry, is
``asyncio.sleep``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import httpx

import clustermap
from clustermap.client import ClusterMap
from clustermap.errors import ClusterMapError, UnknownService
from clustermap.feedback.calls import Call
from clustermap.feedback.retries import Attempts, Outcome
from clustermap.http._policy import ATTEMPT_HEADER, Failure, Policy, Target, target_of_host
from clustermap.model import Node

__all__ = ["AsyncTransport", "Transport"]

Inner = TypeVar("Inner", httpx.HTTPTransport, httpx.AsyncHTTPTransport)

KeyOption = str | bytes | Callable[[httpx.Request], str | bytes | None] | None


def _failure(exc: httpx.TransportError) -> Failure:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return Failure.CONNECT
    if isinstance(exc, httpx.TimeoutException):
        return Failure.TIMEOUT
    return Failure.RESET


def _node_url_fast(url: httpx.URL, node: Node) -> httpx.URL:
    # httpx.URL.copy_with re-parses and re-validates the whole URL (~20 us, most of this
    # module's cost per request); the parsed form is a NamedTuple whose host and port can be
    # swapped directly. Used only if it gives what copy_with gives (checked once, below).
    new = httpx.URL.__new__(httpx.URL)
    new._uri_reference = url._uri_reference._replace(host=node.host.lower(), port=node.port)
    return new


def _fast_is_exact() -> bool:
    try:
        for host in ("10.0.0.7", "fd00::7", "node-a.internal"):
            url = httpx.URL("https://u:p@user-svc:8443/a/b?c=1#d")
            node = Node(host, 9000)
            if str(_node_url_fast(url, node)) != str(url.copy_with(host=host, port=9000)):
                return False
    except Exception:  # any change in httpx internals: use copy_with
        return False
    return True


_FAST_URL = _fast_is_exact()


def _node_url(url: httpx.URL, node: Node) -> httpx.URL:
    if _FAST_URL:
        return _node_url_fast(url, node)
    return url.copy_with(host=node.host, port=node.port)


def _to_node(request: httpx.Request, target: Target, node: Node, attempt: int) -> httpx.Request:
    """A copy of ``request`` addressed to ``node``: Host keeps the service, TLS verifies the
    service's name (httpcore's ``sni_hostname``). The caller's request is left as it was, so
    httpx resolves redirects against the service's URL."""
    headers = request.headers.copy()
    headers["Host"] = target.host_header
    headers[ATTEMPT_HEADER] = str(attempt)
    extensions = dict(request.extensions)
    if request.url.scheme == "https":
        extensions["sni_hostname"] = target.tls_name
    return httpx.Request(
        request.method,
        _node_url(request.url, node),
        headers=headers,
        stream=request.stream,
        extensions=extensions,
    )


class _Routing(Generic[Inner]):
    """What both transports share: options, the map lookup, the per-process inner transport."""

    _inner_class: type[Inner]

    def __init__(
        self,
        map: ClusterMap | None = None,
        *,
        key: KeyOption = None,
        strategy: str | None = None,
        subset: Mapping[str, str] | None = None,
        policy: Policy | None = None,
        tls_server_name: str | None = None,
        **transport_kwargs: Any,
    ) -> None:
        self.map: ClusterMap = map if map is not None else clustermap._default
        self.key = key
        self.strategy = strategy
        self.subset = dict(subset) if subset else None
        self.policy = policy or Policy()
        self.tls_server_name = tls_server_name
        self._transport_kwargs = transport_kwargs
        self._inner: Inner = self._inner_class(**transport_kwargs)
        self._pid = os.getpid()

    @property
    def inner(self) -> Inner:
        """This process's wrapped transport (a new one after a fork)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._inner = self._inner_class(**self._transport_kwargs)
        return self._inner

    def _is_service(self, host: str) -> bool:
        try:
            self.map.service(host)
        except UnknownService:
            return False
        except ClusterMapError:
            return False
        return True

    def _target(self, request: httpx.Request) -> Target | None:
        url = request.url
        host_header = request.headers.get("Host") or url.netloc.decode("ascii")
        return target_of_host(url.host, host_header, self._is_service, self.tls_server_name)

    def _attempts(self, request: httpx.Request, target: Target) -> Attempts:
        key = self.key(request) if callable(self.key) else self.key
        return Attempts(
            self.map, target.service, key, self.strategy, self.subset, self.policy.budget
        )

    def _feedback(self, call: Call, response: httpx.Response) -> None:
        if self.policy.is_failure(response.status_code):
            call.mark_failed()

    def _judge(
        self, request: httpx.Request, attempts: Attempts, got: httpx.Response | httpx.TransportError
    ) -> bool:
        """Whether the policy allows another attempt after this one."""
        if isinstance(got, httpx.Response):
            if got.status_code not in self.policy.retry_statuses:
                return False
            failure = Failure.STATUS
        else:
            failure = _failure(got)
        replayable = isinstance(request.stream, httpx.ByteStream)
        return self.policy.may_retry(failure, request.method, replayable, attempts.retries)


def _discard(response: httpx.Response) -> None:
    response.read()
    response.close()


async def _adiscard(response: httpx.Response) -> None:
    await response.aread()
    await response.aclose()


class Transport(_Routing[httpx.HTTPTransport], httpx.BaseTransport):
    """``httpx.Client(transport=clustermap.http.Transport())``: see docs/http.md.

    Options as for :class:`clustermap.http.Session`; ``transport_kwargs`` go to the wrapped
    ``httpx.HTTPTransport`` (``verify``, ``cert``, ``limits``, ``http2``, ...), which is made
    again in a forked child (the parent's connections stay the parent's).
    """

    _inner_class = httpx.HTTPTransport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        inner = self.inner
        target = self._target(request)
        if target is None:
            return inner.handle_request(request)
        attempts = self._attempts(request, target)

        def attempt(call: Call) -> Outcome[httpx.Response]:
            with call:
                try:
                    response = inner.handle_request(
                        _to_node(request, target, call.node, attempts.retries + 1)
                    )
                except httpx.TransportError as exc:
                    call.mark_failed()
                    return Outcome(error=exc, retry=self._judge(request, attempts, exc))
                self._feedback(call, response)
            return Outcome(response, retry=self._judge(request, attempts, response))

        return attempts.run(attempt, self.policy.backoff, _discard)

    def close(self) -> None:
        if self._pid == os.getpid():
            self._inner.close()


class AsyncTransport(_Routing[httpx.AsyncHTTPTransport], httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=clustermap.http.AsyncTransport())``: see docs/http.md.

    The same as :class:`Transport` around ``httpx.AsyncHTTPTransport``; use one per event loop.
    """

    _inner_class = httpx.AsyncHTTPTransport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        inner = self.inner
        target = self._target(request)
        if target is None:
            return await inner.handle_async_request(request)
        attempts = self._attempts(request, target)

        async def attempt(call: Call) -> Outcome[httpx.Response]:
            with call:
                try:
                    response = await inner.handle_async_request(
                        _to_node(request, target, call.node, attempts.retries + 1)
                    )
                except httpx.TransportError as exc:
                    call.mark_failed()
                    return Outcome(error=exc, retry=self._judge(request, attempts, exc))
                self._feedback(call, response)
            return Outcome(response, retry=self._judge(request, attempts, response))

        return await attempts.run_async(attempt, self.policy.backoff, _adiscard)

    async def aclose(self) -> None:
        if self._pid == os.getpid():
            await self._inner.aclose()
