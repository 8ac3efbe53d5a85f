"""The connection to etcd: the ``--store etcd://...`` URL, one gRPC channel, retried calls.

Client: etcd's own gRPC API, from its protos vendored into ``proto/etcd/`` and generated with our
grpcio/protobuf (``clustermap._pb.etcd``); see docs/server.md, "etcd store", for why.

Every failure leaves this module as :class:`EtcdError` (a
:class:`~clustermap.server.store.StoreError`) carrying etcd's status code and details, so the
layers above never handle gRPC errors of etcd's.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import grpc

from clustermap._pb.etcd.etcdserverpb import rpc_pb2, rpc_pb2_grpc
from clustermap.model import format_address, parse_address
from clustermap.retry import Retry
from clustermap.server.etcd_auth import EtcdCredentials, open_channel
from clustermap.server.etcd_codec import DEFAULT_PREFIX
from clustermap.server.store import StoreError

__all__ = ["Client", "EtcdError", "parse_etcd_url"]

T = TypeVar("T")

_RETRYABLE: Final = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
#: Attempts of one call: 50 ms doubling to 0.5 s between them, until the call's deadline.
_RETRY: Final = Retry(delay=0.05, backoff=2.0, max_delay=0.5)


class EtcdError(StoreError):
    """etcd cannot be reached or refused a request (after retries)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = ""):
        super().__init__(message)
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> EtcdError:
        code, details = exc.code(), exc.details() or ""
        return cls(f"etcd: {code.name}: {details}", code, details)


def _retryable(exc: Exception) -> bool:
    """UNAVAILABLE (member down, leader election) or a slow attempt: another try may succeed."""
    return isinstance(exc, grpc.RpcError) and exc.code() in _RETRYABLE


def parse_etcd_url(url: str) -> tuple[list[str], str]:
    """``etcd://HOST:PORT[,HOST:PORT...][/prefix]`` → (endpoints, key prefix ending in ``/``)."""
    parts = urlsplit(url)
    if parts.scheme != "etcd" or not parts.netloc:
        raise ValueError(f"{url!r} is not etcd://HOST:PORT[,HOST:PORT...][/prefix]")
    endpoints = []
    for ep in parts.netloc.split(","):
        try:
            host, port = parse_address(ep)
        except ValueError:
            raise ValueError(f"{ep!r} in {url!r} is not HOST:PORT") from None
        endpoints.append(f"{host}:{port}")  # unbracketed: Client splits at the last colon
    path = parts.path.strip("/")
    prefix = f"/{path}/" if path else DEFAULT_PREFIX
    return endpoints, prefix


class Client:
    """The gRPC channel to the etcd cluster (every member; gRPC balances and fails over)."""

    def __init__(
        self, endpoints: Sequence[str], timeout: float, credentials: EtcdCredentials | None = None
    ) -> None:
        v4: list[str] = []
        v6: list[str] = []
        for ep in endpoints:
            host, port = parse_address(ep)
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise EtcdError(f"cannot resolve etcd endpoint {ep}: {exc}") from None
            for family, *_, sockaddr in infos[:1]:
                (v6 if family == socket.AF_INET6 else v4).append(
                    format_address(str(sockaddr[0]), port)
                )
        # one static address list per channel: gRPC's ipv4:/ipv6: targets take one family
        self.target = "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)
        self.timeout = timeout
        self.channel = open_channel(
            self.target,
            [
                ("grpc.lb_policy_name", "round_robin"),
                ("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
            ],
            credentials,
            timeout,
            server_name=parse_address(endpoints[0])[0],
        )
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self._keepalive = _KeepAlive(self.lease)

    @property
    def where(self) -> str:
        return self.target.partition(":")[2]

    def call(self, fn: Callable[..., T], request: Any, attempt_timeout: float = 1.0) -> T:
        """A unary call, retried with backoff on UNAVAILABLE (member down, leader election) and
        on a slow attempt (a follower whose leader just died holds requests until etcd's own
        request timeout; another member answers at once). Every request we send is safe to
        repeat: writes are guarded by ``mod_revision`` compares, a repeated lease grant only
        leaves an unused lease to expire. Failures raise :class:`EtcdError`."""
        try:
            return _RETRY.within(max(self.timeout, attempt_timeout))(
                lambda remaining: fn(
                    request,
                    timeout=max(0.05, min(attempt_timeout, remaining)),
                    wait_for_ready=True,
                ),
                _retryable,
            )
        except grpc.RpcError as exc:
            raise EtcdError.from_rpc(exc) from None

    def keepalive(self, lease: int) -> int:
        """Renew ``lease`` over the one shared keep-alive stream: its TTL, 0 if it is gone."""
        try:
            return _RETRY.within(self.timeout)(
                lambda remaining: self._keepalive.renew(lease, max(0.05, min(1.0, remaining))),
                _retryable,
            )
        except grpc.RpcError as exc:
            raise EtcdError.from_rpc(exc) from None

    def close(self) -> None:
        self._keepalive.close()
        self.channel.close()


class _KeepAlive:
    """One long-lived ``LeaseKeepAlive`` stream shared by every renewal of this process.

    etcd answers a stream's requests in order, one response per request, so waiters queue in
    send order and each takes the next response. A broken stream fails its waiters (the caller
    retries) and the next renewal opens a new one."""

    def __init__(self, stub: rpc_pb2_grpc.LeaseStub) -> None:
        self._stub = stub
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._closed = False

    def renew(self, lease: int, timeout: float) -> int:
        with self._lock:
            if self._closed:
                raise EtcdError("closed")
            stream = self._stream
            if stream is None or stream.broken is not None:
                stream = self._stream = _Stream(self._stub)
            slot = stream.send(lease)
        if not slot.done.wait(timeout):
            stream.fail(_Timeout())  # the stream is wedged: the next renewal opens another
        if isinstance(slot.result, BaseException):
            raise slot.result
        return slot.result

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


class _Slot:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: int | BaseException = 0


class _Timeout(grpc.RpcError):  # type: ignore[misc]
    """A keep-alive answer that did not come in time (retried like DEADLINE_EXCEEDED)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "no keep-alive answer in time"


class _Stream:
    """One open keep-alive stream: requests in, responses matched to waiters in order."""

    def __init__(self, stub: rpc_pb2_grpc.LeaseStub) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._outbox: list[rpc_pb2.LeaseKeepAliveRequest | None] = []
        self._waiting: list[_Slot] = []
        self.broken: BaseException | None = None
        self._call = stub.LeaseKeepAlive(self._requests(), wait_for_ready=True)
        threading.Thread(target=self._read, name="cm-etcd-keepalive", daemon=True).start()

    def send(self, lease: int) -> _Slot:
        slot = _Slot()
        with self._lock:
            if self.broken is not None:
                slot.result = self.broken
                slot.done.set()
                return slot
            self._waiting.append(slot)
            self._outbox.append(rpc_pb2.LeaseKeepAliveRequest(ID=lease))
            self._cond.notify()
        return slot

    def _requests(self) -> Iterator[rpc_pb2.LeaseKeepAliveRequest]:
        while True:
            with self._lock:
                self._cond.wait_for(lambda: bool(self._outbox))
                item = self._outbox.pop(0)
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for resp in self._call:
                with self._lock:
                    if not self._waiting:
                        continue
                    slot = self._waiting.pop(0)
                slot.result = max(0, int(resp.TTL))
                slot.done.set()
            self.fail(_Timeout())
        except grpc.RpcError as exc:
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.broken is None:
                self.broken = exc
            waiting, self._waiting = self._waiting, []
            self._outbox.append(None)
            self._cond.notify()
        self._call.cancel()
        for slot in waiting:
            slot.result = exc
            slot.done.set()

    def close(self) -> None:
        self.fail(EtcdError("closed"))
