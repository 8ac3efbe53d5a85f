"""TLS and username/password authentication toward etcd: the channel the etcd store talks over.

* **TLS**: a CA to verify etcd (``--etcd-ca``) and, for etcd's ``--client-cert-auth``, a client
  certificate and key (``--etcd-cert``/``--etcd-key``). The files are read once, at start.
* **Auth**: etcd's ``Auth.Authenticate`` turns a user name and password into a token that every
  request then carries in its ``token`` metadata. Tokens expire (etcd's ``--auth-token-ttl``,
  300 s by default, and on a member restart), so the token is renewed when it is older than
  :data:`TOKEN_REFRESH` before a call, and at once when etcd answers "invalid auth token" to a
  unary call (which is then repeated once).

:func:`open_channel` also makes one fail-fast call before the store starts, so that a wrong
password, a certificate etcd refuses or a TLS/plain-text mismatch is reported as one clear line
instead of a timeout.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import grpc

from clustermap._pb.etcd.etcdserverpb import rpc_pb2, rpc_pb2_grpc

__all__ = ["EtcdAuthError", "EtcdCredentials", "open_channel"]

log = logging.getLogger("clustermap.server.etcd")

#: A token older than this is renewed before the next call (etcd's default TTL is 300 s).
TOKEN_REFRESH: Final = 60.0


class EtcdAuthError(Exception):
    """A TLS or authentication problem toward etcd; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class EtcdCredentials:
    """How cm-server proves itself to etcd. Empty: plain text, no authentication."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read("--etcd-ca", self.ca),
            private_key=_read("--etcd-key", self.key),
            certificate_chain=_read("--etcd-cert", self.cert),
        )


def _read(flag: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EtcdAuthError(f"cannot read {flag} {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise EtcdAuthError(f"{flag} {path} is not a PEM file")
    return data


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _Token(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds etcd's ``token`` metadata to every call; renews it (see the module docstring)."""

    def __init__(self, authenticate: Callable[[], str], clock: Callable[[], float]) -> None:
        self._authenticate = authenticate
        self._clock = clock
        self._lock = threading.Lock()
        self._token = ""
        self._at = -float("inf")

    def token(self, stale: str | None = None) -> str:
        with self._lock:
            if self._token == stale or self._clock() - self._at > TOKEN_REFRESH:
                self._token = self._authenticate()
                self._at = self._clock()
            return self._token

    def _with(self, details: Any, token: str) -> _Details:
        metadata = [*(details.metadata or ()), ("token", token)]
        return _Details(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        token = self.token()
        outcome = continuation(self._with(details, token), request)
        exc = outcome.exception()
        if isinstance(exc, grpc.RpcError) and _invalid_token(exc):
            outcome = continuation(self._with(details, self.token(stale=token)), request)
        return outcome

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with(details, self.token()), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with(details, self.token()), requests)


def _invalid_token(exc: grpc.RpcError) -> bool:
    return exc.code() == grpc.StatusCode.UNAUTHENTICATED or "invalid auth token" in (
        exc.details() or ""
    )


def _explain(exc: grpc.RpcError, where: str, creds: EtcdCredentials) -> str | None:
    """One line for a TLS or auth failure; None for anything else (left to the store).

    The patterns are what grpcio and etcd 3.4 say (tests/integration/etcd/test_etcd_security.py
    meets each one)."""
    details = exc.details() or ""
    low = details.lower()
    if "authentication failed" in low or "invalid user" in low:
        return f"etcd at {where} refused user {creds.user!r}: wrong user name or password"
    if "user name is empty" in low:
        return f"etcd at {where} requires authentication: give --etcd-user and its password"
    if "permission denied" in low:
        who = f"user {creds.user!r}" if creds.user else "this client (its certificate's CN)"
        return f"etcd at {where} denied {who} access: grant it a role on the key prefix"
    if not creds.tls:
        if "socket closed" in low:
            return (
                f"etcd at {where} closed the connection: does it serve TLS? "
                "give --etcd-ca (and --etcd-cert/--etcd-key)"
            )
        return None
    if "handshake read failed" in low or "wrong_version_number" in low:
        return f"etcd at {where} does not answer TLS: is it serving plain text (http://)?"
    if "certificate_verify_failed" in low:
        return f"etcd at {where} has a certificate that --etcd-ca does not verify"
    if "tsi_data_corrupted" in low or "bad_certificate" in low:
        return (
            f"etcd at {where} refused the client certificate: give --etcd-cert/--etcd-key "
            "signed by a CA etcd trusts"
        )
    if "handshake" in low or "ssl" in low:
        return f"TLS handshake with etcd at {where} failed ({details.rpartition('): ')[2]})"
    return None


def open_channel(
    target: str,
    options: Sequence[tuple[str, Any]],
    creds: EtcdCredentials | None,
    timeout: float,
    *,
    server_name: str | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> grpc.Channel:
    """The channel to etcd for ``target`` (``ipv4:A,B``), with TLS and auth as ``creds`` say.

    ``server_name``: the endpoint as configured. The target holds resolved addresses, so a name
    (not an IP literal) is what etcd's certificate is checked against instead."""
    creds = creds or EtcdCredentials()
    options = list(options)
    if creds.tls and server_name and not _is_ip(server_name):
        options.append(("grpc.ssl_target_name_override", server_name))
    channel = (
        grpc.secure_channel(target, creds.channel_credentials(), options=options)
        if creds.tls
        else grpc.insecure_channel(target, options=list(options))
    )
    where = target.partition(":")[2]
    try:
        _check(channel, creds, where, timeout)
    except BaseException:
        channel.close()
        raise
    if not creds.user:
        return channel
    auth = rpc_pb2_grpc.AuthStub(channel)
    user, password = creds.user, creds.password or ""

    def authenticate() -> str:
        try:
            reply = auth.Authenticate(
                rpc_pb2.AuthenticateRequest(name=user, password=password),
                timeout=timeout,
                wait_for_ready=True,
            )
        except grpc.RpcError as exc:
            if "authentication is not enabled" in (exc.details() or ""):
                return ""
            log.warning("etcd authentication failed: %s", exc.details())
            raise
        return str(reply.token)

    return grpc.intercept_channel(channel, _Token(authenticate, clock))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check(channel: grpc.Channel, creds: EtcdCredentials, where: str, timeout: float) -> None:
    """One fail-fast call (Authenticate with a user, Status without); raises
    :class:`EtcdAuthError` for what :func:`_explain` recognises. Anything else (etcd not up yet,
    a slow answer) is left to the store's own retries and errors."""
    try:
        if creds.user:
            rpc_pb2_grpc.AuthStub(channel).Authenticate(
                rpc_pb2.AuthenticateRequest(name=creds.user, password=creds.password or ""),
                timeout=timeout,
            )
        else:
            rpc_pb2_grpc.MaintenanceStub(channel).Status(rpc_pb2.StatusRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        if "authentication is not enabled" in (exc.details() or ""):
            log.warning("etcd at %s has authentication off; --etcd-user is not used", where)
            return
        message = _explain(exc, where, creds)
        if message is not None:
            raise EtcdAuthError(message) from None
