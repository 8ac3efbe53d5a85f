"""gRPC calls to a service in the map: one channel per node, a pick per call (docs/http.md).

::

    import clustermap.grpc
    channel = clustermap.grpc.Channel("user-svc")          # pass it where a grpc.Channel goes
    stub = users_pb2_grpc.UsersStub(channel)
    stub.Get(users_pb2.GetRequest(id=42), timeout=1.0)      # a node picked for this call

Python grpcio has no pluggable name resolver or load balancer, so this is not a ``grpc.Channel``
that resolves ``user-svc`` inside grpc: it is an object with the four ``grpc.Channel`` factory
methods (what generated stubs call) that, on every unary call, picks a node through
:meth:`ClusterMap.call`, sends the call on that node's own ``grpc.Channel`` (made on first use,
kept and reused), records the outcome from the status code and retries ``retry_codes`` on
another node within the machine's retry budget. Streaming calls get a pick per call but no
feedback and no retry (their outcome is known only as the stream is consumed).

Channels belong to the process that made them: after a fork the child makes its own, and the
parent's are neither used nor closed in the child (gunicorn's master may have made some).
:class:`AioChannel` is the same for ``grpc.aio``; use one per event loop.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

try:
    import grpc
    import grpc.aio
except ImportError as exc:  # pragma: no cover - grpcio is also the server's dependency
    raise ImportError("clustermap.grpc needs grpcio: pip install 'clustermap[grpc]'") from exc

import clustermap
from clustermap.client import ClusterMap
from clustermap.feedback.budget import BudgetRule
from clustermap.feedback.calls import Call
from clustermap.feedback.retries import Attempts, Outcome, RequestFailed, jittered_backoff
from clustermap.model import Node

__all__ = [
    "FAILURE_CODES",
    "RETRY_CODES",
    "AioChannel",
    "Channel",
    "RequestFailed",
]

#: Status codes that count as a failure of the node (the gRPC equivalents of 5xx and no answer).
FAILURE_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)
#: Status codes retried on another node: UNAVAILABLE is what a refused or broken connection
#: gives, and what gRPC's own guidance says to retry.
RETRY_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE})

KeyOption = str | bytes | Callable[[Any], str | bytes | None] | None

#: Channels a forked child inherited: kept referenced so the child never closes them.
_inherited: list[object] = []


class _Options:
    def __init__(
        self,
        service: str,
        map: ClusterMap | None,
        key: KeyOption,
        strategy: str | None,
        subset: dict[str, str] | None,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]],
        failure_codes: frozenset[grpc.StatusCode],
        retry_codes: frozenset[grpc.StatusCode],
        max_retries: int,
        budget: BudgetRule | None,
        backoff_base: float,
        backoff_max: float,
    ) -> None:
        self.service = service
        self.map: ClusterMap = map if map is not None else clustermap._default
        self.key = key
        self.strategy = strategy
        self.subset = subset
        self.credentials = credentials
        # :authority stays the service's name; with TLS the certificate is checked against it.
        extra: list[tuple[str, Any]] = [("grpc.default_authority", service)]
        if credentials is not None:
            extra.append(("grpc.ssl_target_name_override", service))
        names = {k for k, _ in options}
        self.options = [*options, *[(k, v) for k, v in extra if k not in names]]
        self.failure_codes = failure_codes
        self.retry_codes = retry_codes
        self.max_retries = max_retries
        self.budget = budget or BudgetRule()
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max

    def attempts(self, request: object) -> Attempts:
        key = self.key(request) if callable(self.key) else self.key
        return Attempts(self.map, self.service, key, self.strategy, self.subset, self.budget)

    def judge(self, call: Call, exc: grpc.RpcError, attempts: Attempts) -> Outcome[Any]:
        """A failed call: the node's fault (a failure code) or not (the node answered with an
        application error), and whether it may be retried elsewhere."""
        code = exc.code()
        if code in self.failure_codes:
            call.mark_failed()
        else:
            call.mark_ok()
        return Outcome(error=exc, retry=self.may_retry(code, attempts))

    def may_retry(self, code: grpc.StatusCode | None, attempts: Attempts) -> bool:
        return code in self.retry_codes and attempts.retries < self.max_retries

    def backoff(self, retry: int) -> float:
        return jittered_backoff(retry, self.backoff_base, self.backoff_max)


def _remaining(timeout: float | None, start: float) -> float | None:
    """The caller's deadline covers every attempt."""
    return None if timeout is None else max(0.0, timeout - (time.monotonic() - start))


class _Pool:
    """One channel per node address for this process (a fork starts a new pool)."""

    def __init__(self, make: Callable[[str], Any]) -> None:
        self._make = make
        self._channels: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def get(self, node: Node) -> Any:
        if self._pid != os.getpid():
            self._lock = threading.Lock()
            _inherited.append(self._channels)  # the parent's: never used nor closed here
            self._channels = {}
            self._pid = os.getpid()
        ch = self._channels.get(node.address)
        if ch is None:
            with self._lock:
                ch = self._channels.get(node.address)
                if ch is None:
                    ch = self._channels[node.address] = self._make(_target(node))
        return ch

    def take_all(self) -> list[Any]:
        with self._lock:
            mine = list(self._channels.values()) if self._pid == os.getpid() else []
            self._channels = {}
            return mine


def _target(node: Node) -> str:
    return node.address


class Channel:
    """What a generated stub needs of a ``grpc.Channel``, over the nodes of ``service``.

    ``key`` (fixed, or a callable of the request message), ``strategy`` and ``subset`` choose
    the node as for :func:`clustermap.call`. ``credentials`` (``grpc.ssl_channel_credentials``)
    makes secure channels whose certificates are verified against the service's name;
    ``options`` go to every node's channel. A unary call is retried on another node after a
    status in ``retry_codes`` (at most ``max_retries`` times, within the retry budget, the
    caller's ``timeout`` covering every attempt); the last error is the ``grpc.RpcError`` with
    :class:`RequestFailed` mixed in (``.tried``).
    """

    def __init__(
        self,
        service: str,
        map: ClusterMap | None = None,
        *,
        key: KeyOption = None,
        strategy: str | None = None,
        subset: dict[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        failure_codes: frozenset[grpc.StatusCode] = FAILURE_CODES,
        retry_codes: frozenset[grpc.StatusCode] = RETRY_CODES,
        max_retries: int = 2,
        budget: BudgetRule | None = None,
        backoff_base: float = 0.025,
        backoff_max: float = 0.25,
    ) -> None:
        self._o = _Options(
            service, map, key, strategy, subset, credentials, options, failure_codes,
            retry_codes, max_retries, budget, backoff_base, backoff_max,
        )  # fmt: skip
        self._pool = _Pool(self._make)

    def _make(self, target: str) -> grpc.Channel:
        o = self._o
        if o.credentials is not None:
            return grpc.secure_channel(target, o.credentials, options=o.options)
        return grpc.insecure_channel(target, options=o.options)

    def channel_for(self, node: Node) -> grpc.Channel:
        """This process's channel to ``node`` (made on first use, then reused)."""
        channel: grpc.Channel = self._pool.get(node)
        return channel

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> _UnaryUnary:
        return _UnaryUnary(self, method, request_serializer, response_deserializer)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> _PickPerCall:
        return _PickPerCall(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> _PickPerCall:
        return _PickPerCall(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> _PickPerCall:
        return _PickPerCall(self, "stream_stream", method, args, kwargs)

    def close(self) -> None:
        for ch in self._pool.take_all():
            ch.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _UnaryUnary:
    def __init__(
        self,
        channel: Channel,
        method: str,
        serializer: Callable[[Any], bytes] | None,
        deserializer: Callable[[bytes], Any] | None,
    ) -> None:
        self._channel = channel
        self._method = method
        self._serializer = serializer
        self._deserializer = deserializer
        self._callables: dict[Any, Any] = {}  # node channel -> its multicallable

    def _callable(self, node: Node) -> Any:
        ch = self._channel.channel_for(node)
        mc = self._callables.get(ch)
        if mc is None:
            mc = ch.unary_unary(
                self._method,
                request_serializer=self._serializer,
                response_deserializer=self._deserializer,
            )
            self._callables = {**self._callables, ch: mc}  # copy-on-write: no lock to read
        return mc

    def __call__(self, request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return self.with_call(request, timeout, **kwargs)[0]

    def with_call(
        self, request: Any, timeout: float | None = None, **kwargs: Any
    ) -> tuple[Any, grpc.Call]:
        o = self._channel._o
        start = time.monotonic()
        attempts = o.attempts(request)

        def attempt(call: Call) -> Outcome[tuple[Any, grpc.Call]]:
            with call:
                try:
                    answer: tuple[Any, grpc.Call] = self._callable(call.node).with_call(
                        request, timeout=_remaining(timeout, start), **kwargs
                    )
                except grpc.RpcError as exc:
                    return o.judge(call, exc, attempts)
            return Outcome(answer)

        return attempts.run(attempt, o.backoff)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("clustermap.grpc: use the blocking call, or AioChannel")


class _PickPerCall:
    """A streaming method: a node picked per call, no feedback, no retry."""

    def __init__(
        self, channel: Channel, kind: str, method: str, args: tuple[Any, ...], kw: dict[str, Any]
    ) -> None:
        self._channel = channel
        self._kind = kind
        self._method = method
        self._args = args
        self._kwargs = kw

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        o = self._channel._o
        node = o.map.pick(o.service, None, o.strategy)
        ch = self._channel.channel_for(node)
        return getattr(ch, self._kind)(self._method, *self._args, **self._kwargs)(*args, **kwargs)


class AioChannel:
    """:class:`Channel` for ``grpc.aio`` stubs (unary calls picked, judged, retried; streaming
    calls picked). Its channels belong to the event loop that made them: one per loop."""

    def __init__(self, service: str, map: ClusterMap | None = None, **kw: Any) -> None:
        self._sync = Channel(service, map, **kw)
        self._o = self._sync._o
        self._pool = _Pool(self._make)

    def _make(self, target: str) -> grpc.aio.Channel:
        o = self._o
        if o.credentials is not None:
            return grpc.aio.secure_channel(target, o.credentials, options=o.options)
        return grpc.aio.insecure_channel(target, options=o.options)

    def channel_for(self, node: Node) -> grpc.aio.Channel:
        channel: grpc.aio.Channel = self._pool.get(node)
        return channel

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> _AioUnaryUnary:
        return _AioUnaryUnary(self, method, request_serializer, response_deserializer)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> _PickPerCall:
        return _PickPerCall(self, "unary_stream", method, args, kwargs)  # type: ignore[arg-type]

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> _PickPerCall:
        return _PickPerCall(self, "stream_unary", method, args, kwargs)  # type: ignore[arg-type]

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> _PickPerCall:
        return _PickPerCall(self, "stream_stream", method, args, kwargs)  # type: ignore[arg-type]

    async def close(self) -> None:
        for ch in self._pool.take_all():
            await ch.close()

    async def __aenter__(self) -> AioChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _AioUnaryUnary:
    def __init__(
        self,
        channel: AioChannel,
        method: str,
        serializer: Callable[[Any], bytes] | None,
        deserializer: Callable[[bytes], Any] | None,
    ) -> None:
        self._channel = channel
        self._method = method
        self._serializer = serializer
        self._deserializer = deserializer

    async def __call__(self, request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        o = self._channel._o
        start = time.monotonic()
        attempts = o.attempts(request)

        async def attempt(call: Call) -> Outcome[Any]:
            with call:
                mc = self._channel.channel_for(call.node).unary_unary(
                    self._method,
                    request_serializer=self._serializer,
                    response_deserializer=self._deserializer,
                )
                try:
                    answer = await mc(request, timeout=_remaining(timeout, start), **kwargs)
                except grpc.RpcError as exc:
                    return o.judge(call, exc, attempts)
            return Outcome(answer)

        return await attempts.run_async(attempt, o.backoff)
