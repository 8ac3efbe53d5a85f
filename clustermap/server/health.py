"""``grpc.health.v1.Health`` on the server's event loop, which no client can wedge.

grpc_health's reference (threaded) servicer sent a Watch's first answer while holding its lock,
and its close callback (run by gRPC's event thread when a stream is cancelled) took that same
lock: after a few thousand Watch open/cancel cycles every RPC hung and SIGTERM no longer stopped
the server (issue 17).

Here there is no lock at all: the table of statuses is touched on the loop only. Other threads
(the main loop flipping SERVING when warm-up ends, the shutdown) hand changes over with
:meth:`LoopThread.call_soon`. A Watch stream is a coroutine, not a thread: it writes the current
status, then awaits the next change; a cancelled stream simply stops. At most
:data:`MAX_WATCHERS` streams are held (each has at most one answer in flight); one more is
refused RESOURCE_EXHAUSTED. :meth:`enter_graceful_shutdown` makes everything NOT_SERVING and
returns once every stream has been told so and ended: the server's stop that follows neither
waits on a health watcher nor cuts one short before its last answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clustermap.server.serving import LoopThread

__all__ = ["MAX_WATCHERS", "HealthServicer"]

MAX_WATCHERS: Final = 10_000

_NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN: Final = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Check, List and Watch over a table of statuses (see the module docstring)."""

    def __init__(self, loop: LoopThread) -> None:
        self._loop = loop
        self._status: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._closing = False
        self._watchers = 0
        self._change: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None  # set when the last stream ends

    # -- RPCs (on the loop) -----------------------------------------------------------------

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={k: health_pb2.HealthCheckResponse(status=v) for k, v in self._status.items()}
        )

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        if self._watchers >= MAX_WATCHERS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many health watchers")
        self._watchers += 1
        try:
            sent = None
            while True:
                if self._change is None or self._change.done():
                    self._change = asyncio.get_running_loop().create_future()
                change = self._change
                status = self._status.get(request.service, _UNKNOWN)
                if status != sent:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    sent = status
                    # look again: the shutdown (or any change) may have landed while this
                    # answer was in flight (the peer can read it before the write returns here);
                    # ending now would close the stream without its last answer
                    continue
                if self._closing:
                    return
                # asyncio.wait, not ``await change``: a cancelled stream must not cancel the
                # future every other watcher waits on
                await asyncio.wait((change,))
        finally:
            self._watchers -= 1
            drained = self._drained
            if self._watchers == 0 and drained is not None and not drained.done():
                drained.set_result(None)

    # -- the server's side (any thread) -------------------------------------------------

    def set(self, service: str, status: int) -> None:
        """Set a service's status and tell its watchers (ignored once shutting down)."""
        self._loop.call_soon(self._update, service, status)

    def enter_graceful_shutdown(self, timeout: float = 5.0) -> None:
        """Everything NOT_SERVING for good; returns once every Watch stream has been told so and
        has ended (at most ``timeout`` seconds: a client that stopped reading cannot hold it)."""
        self._loop.call(self._shut(timeout))

    # -- on the loop ----------------------------------------------------------------------

    def _update(self, service: str, status: int) -> None:
        if self._closing or self._status.get(service) == status:
            return
        self._status[service] = status
        self._wake()

    async def _shut(self, timeout: float) -> None:
        for service in self._status:
            self._status[service] = _NOT_SERVING
        self._closing = True
        if self._watchers:
            self._drained = asyncio.get_running_loop().create_future()
        self._wake()
        if self._drained is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)

    def _wake(self) -> None:
        if self._change is not None and not self._change.done():
            self._change.set_result(None)
        self._change = None
