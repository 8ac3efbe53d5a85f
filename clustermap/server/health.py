"""``grpc.health.v1.Health`` that no client can wedge.

grpc_health's reference servicer sends a Watch's first answer while holding its lock, and its
close callback (run by gRPC's event thread when a stream is cancelled) takes that same lock. The
send needs the event thread, the event thread waits for the lock: after a few thousand Watch
open/cancel cycles every RPC hangs and SIGTERM no longer stops the server (issue 17).

Here the lock only guards the table of statuses and watchers; it is never held while sending,
and sending never happens on a gRPC thread:

* ``Watch`` is a non-blocking handler: it records the watcher and queues its first answer, then
  returns; it holds no worker thread for the life of the stream;
* one daemon thread (``cm-health``) performs every send from the queue, in order; a stream whose
  client is gone is skipped by gRPC at once;
* the close callback only removes the watcher from the table (a short critical section with no
  I/O);
* :meth:`enter_graceful_shutdown` queues NOT_SERVING and then the end of every stream, so a
  graceful stop never waits on health watchers, and never blocks on a send itself.

At most :data:`MAX_QUEUED` answers wait to be sent; while that many are queued (a client that
never reads can hold the sender), new Watch streams are refused RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["MAX_QUEUED", "HealthServicer"]

log = logging.getLogger("clustermap.server.health")

MAX_QUEUED: Final = 10_000

_Send = Callable[[Any], None]
_SERVING: Final = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN: Final = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Check, List and Watch over a table of statuses (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, int] = {"": _SERVING}
        self._watchers: dict[str, dict[int, _Send]] = {}
        self._ids = itertools.count()
        self._closing = False
        self._outbox: queue.Queue[tuple[_Send, Any] | None] = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name="cm-health", daemon=True)
        self._sender.start()

    # -- RPCs -----------------------------------------------------------------------------

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        with self._lock:
            status = self._status.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        with self._lock:
            statuses = dict(self._status)
        return health_pb2.HealthListResponse(
            statuses={k: health_pb2.HealthCheckResponse(status=v) for k, v in statuses.items()}
        )

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: Any,
        send_response_callback: _Send | None = None,
    ) -> None:
        if send_response_callback is None:  # pragma: no cover - grpc always passes it
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "needs a non-blocking server")
            return
        send: _Send = send_response_callback
        if self._outbox.qsize() >= MAX_QUEUED:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many health watchers")
        service = request.service
        ident = next(self._ids)
        with self._lock:
            status = self._status.get(service, _UNKNOWN)
            self._outbox.put((send, health_pb2.HealthCheckResponse(status=status)))
            if self._closing:
                self._outbox.put((send, None))
                return
            self._watchers.setdefault(service, {})[ident] = send

        def gone() -> None:
            with self._lock:
                watchers = self._watchers.get(service)
                if watchers is not None:
                    watchers.pop(ident, None)
                    if not watchers:
                        del self._watchers[service]

        if not context.add_callback(gone):  # the stream already ended
            gone()

    # -- the server's side ----------------------------------------------------------------

    def set(self, service: str, status: int) -> None:
        """Set a service's status and tell its watchers (ignored once shutting down)."""
        with self._lock:
            if self._closing:
                return
            self._update(service, status)

    def enter_graceful_shutdown(self) -> None:
        """Everything NOT_SERVING for good; every Watch stream is told so, then ended."""
        with self._lock:
            if self._closing:
                return
            for service in list(self._status):
                self._update(service, _NOT_SERVING)
            self._closing = True
            for watchers in self._watchers.values():
                for send in watchers.values():
                    self._outbox.put((send, None))
            self._watchers.clear()

    def _update(self, service: str, status: int) -> None:  # with the lock held
        changed = self._status.get(service) != status
        self._status[service] = status
        if changed:
            response = health_pb2.HealthCheckResponse(status=status)
            for send in self._watchers.get(service, {}).values():
                self._outbox.put((send, response))

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:  # pragma: no cover - the thread is a daemon; nothing stops it
                return
            send, response = item
            try:
                send(response)
            except Exception:  # a send to a stream gRPC has torn down: nothing to do
                log.debug("health send failed", exc_info=True)


HealthServicer.Watch.experimental_non_blocking = True  # type: ignore[attr-defined]
