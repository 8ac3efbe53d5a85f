"""Holding one Watch stream for ``cm-sidecar --watch`` (DESIGN §3b), in a thread of its own.

The thread owns only its channels, its backoff and the open call. Every answer it reads, and the
end of every stream, goes into :attr:`Watcher.events` followed by a wake-up of the main loop; the
main loop applies answers through the same path as poll answers (sidecar/daemon.py), tells the
watcher where its map stands (:meth:`Watcher.resume_from`), and ends the stream
(:meth:`Watcher.restart`) after an answer it rejected or a silence longer than ``watch_silence``.
The thread never touches the main loop's state.

A stream that ends or fails counts against its server; the next one is opened in failover order
across the servers with the same jittered backoff as polls (sidecar/retry.py). Meanwhile the main
loop polls.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc

from clustermap import trace
from clustermap.sidecar.answers import rpc_error, set_aside_invalid
from clustermap.sidecar.config import SidecarSettings
from clustermap.sidecar.poller import subscription_stubs
from clustermap.sidecar.retry import Backoff
from clustermap.wire import PollAnswer, WireError, poll_answer_from_pb, poll_request

__all__ = ["STREAM_OPTIONS", "StreamEvent", "Watcher"]

log = logging.getLogger("clustermap.sidecar")

#: HTTP/2 pings on the stream's channel: a cut network ends the stream within about 17 s even
#: when the server's keepalive answers are far apart. cm-server accepts a ping every 10 s.
_PING_EVERY_MS: Final = 12_000
_PING_TIMEOUT_MS: Final = 5_000

#: The stream's channel options. Keepalive pings as above. No BDP probing, with a fixed 4 MiB
#: receive window instead (as Go and Java gRPC clients run a fixed window): gRPC's BDP estimator
#: sends a PING with almost every DATA frame that arrives after a quiet spell, which is every
#: change on a Watch stream, and the server must read and answer each one. At 5 000 streams that
#: was 40 % of cm-server's CPU per fan-out (docs/performance.md §4b). The fixed window keeps a
#: large full map as fast as with BDP probing (8 MiB over a 50 ms round trip: 0.14 s, 0.18 s with
#: probing, 0.49 s with neither).
STREAM_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.keepalive_time_ms", _PING_EVERY_MS),
    ("grpc.keepalive_timeout_ms", _PING_TIMEOUT_MS),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 4 << 20),
)


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One answer read from stream ``stream``, or (``answer`` is None) the end of that stream."""

    stream: int
    server: str
    answer: PollAnswer | None
    error: str = ""


class Watcher:
    """One Watch stream at a time, reopened until :meth:`close`."""

    def __init__(self, settings: SidecarSettings, wake: Callable[[], None]) -> None:
        self.settings = settings
        self.events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        self._wake = wake
        self._lock = threading.Lock()
        self._resume = ("", 0)
        self._stream = 0
        self._call: Any = None  # the open call (a grpc.Future too), for restart()
        self._stop = threading.Event()
        self._backoff = Backoff(list(settings.server), settings.backoff_base, settings.backoff_max)
        self._until: dict[str, float] = {}
        token = settings.bearer_token()
        self._metadata: Sequence[tuple[str, str]] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._channels, self._stubs = subscription_stubs(settings, list(STREAM_OPTIONS))
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)

    # -- called by the main loop ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def stream(self) -> int:
        """The current stream's number: events of older streams are to be ignored."""
        with self._lock:
            return self._stream

    def resume_from(self, epoch: str, revision: int) -> None:
        """Where the main loop's map stands: the next stream asks for changes since there."""
        with self._lock:
            self._resume = (epoch, revision)

    def restart(self) -> None:
        """End the current stream; the thread opens the next one after its server's backoff."""
        with self._lock:
            self._stream += 1
            call = self._call
        if call is not None:
            call.cancel()

    def close(self) -> None:
        self._stop.set()
        self.restart()
        self._thread.join(timeout=5)
        for channel in self._channels.values():
            channel.close()

    # -- the stream thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            server = self._backoff.order()[0]
            wait = self._until.get(server, 0.0) - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            stream, error = self._hold(server)
            if self._stop.is_set():
                return
            delay = self._backoff.failed(server)  # a stream is meant to last: any end is a failure
            self._until[server] = time.monotonic() + delay
            log.debug("watch stream from %s ended (%s); next try in %.2f s", server, error, delay)
            self._emit(StreamEvent(stream, server, None, error))

    def _hold(self, server: str) -> tuple[int, str]:
        """Open a stream to ``server`` and hand on its answers until it ends; returns the
        stream's number and why it ended."""
        with self._lock:
            stream = self._stream
            epoch, revision = self._resume
            call = self._stubs[server].Watch(
                poll_request(epoch, revision, self.settings.services), metadata=self._metadata
            )
            self._call = call
        try:
            for msg in call:
                trace.mark("sidecar.received", msg.revision)
                try:
                    answer = set_aside_invalid(poll_answer_from_pb(msg))
                except WireError as exc:
                    log.error("rejected a malformed answer on the stream from %s: %s", server, exc)
                    call.cancel()
                    return stream, f"malformed answer: {exc}"
                trace.mark("sidecar.decoded", answer.revision)
                self._backoff.succeeded(server)
                self._until.pop(server, None)
                self._emit(StreamEvent(stream, server, answer))
            return stream, "the server ended the stream"
        except grpc.RpcError as exc:
            return stream, rpc_error(exc)
        finally:
            with self._lock:
                self._call = None

    def _emit(self, event: StreamEvent) -> None:
        self.events.put(event)
        self._wake()
