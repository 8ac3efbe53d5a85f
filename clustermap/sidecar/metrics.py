"""Prometheus metrics and ``/healthz`` for the sidecar, on an optional HOST:PORT."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

__all__ = ["CONNECTION_TIMEOUT", "MAX_CONNECTIONS", "Metrics", "serve"]


class Metrics:
    """Every metric the sidecar exports, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.polls = Counter(
            "clustermap_sidecar_polls", "Polls by outcome", ["outcome"], registry=r
        )
        self.failovers = Counter(
            "clustermap_sidecar_failovers",
            "Polls answered by a server other than the first tried",
            registry=r,
        )
        self.watch_answers = Counter(
            "clustermap_sidecar_watch_answers",
            "Answers read from the Watch stream, by outcome (--watch)",
            ["outcome"],
            registry=r,
        )
        self.watch_reconnects = Counter(
            "clustermap_sidecar_watch_reconnects",
            "Watch streams opened again after one was lost",
            registry=r,
        )
        self.watch_fallbacks = Counter(
            "clustermap_sidecar_watch_fallbacks",
            "Times the Watch stream was lost and the sidecar fell back to polling",
            registry=r,
        )
        self.watching = Gauge(
            "clustermap_sidecar_watching", "1 while the Watch stream is up", registry=r
        )
        self.protections = Counter(
            "clustermap_sidecar_protections",
            "Updates held back (in part or whole) by protection",
            registry=r,
        )
        self.publish_seconds = Histogram(
            "clustermap_sidecar_publish_seconds",
            "Time to publish one update into the region",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.revision = Gauge(
            "clustermap_sidecar_revision", "Server revision of the map", registry=r
        )
        self.services = Gauge("clustermap_sidecar_services", "Services published", registry=r)
        self.nodes = Gauge("clustermap_sidecar_nodes", "Nodes published", registry=r)
        self.protected = Gauge(
            "clustermap_sidecar_protected", "1 while an update is held back", registry=r
        )
        self.stale = Gauge("clustermap_sidecar_stale", "1 while the map is not fresh", registry=r)
        self.last_sync = Gauge(
            "clustermap_sidecar_last_sync_timestamp_seconds",
            "Wall clock of the last successful sync",
            registry=r,
        )
        self.last_sync_age = Gauge(
            "clustermap_sidecar_last_sync_age_seconds",
            "Seconds since the last successful sync",
            registry=r,
        )
        self.quarantined = Gauge(
            "clustermap_sidecar_quarantined",
            "1 for each service whose latest version from the server was refused (it keeps its "
            "last good nodes), with the reason",
            ["service", "reason"],
            registry=r,
        )
        self.quarantined_services = Gauge(
            "clustermap_sidecar_quarantined_services", "Services in quarantine", registry=r
        )
        self.subset_tables_capped = Gauge(
            "clustermap_sidecar_subset_tables_capped",
            "Hashed services some of whose declared subsets get no published table (over a "
            "limit; workers build those themselves)",
            registry=r,
        )
        self.ejections = Counter(
            "clustermap_sidecar_ejections",
            "Nodes ejected from callers' feedback, by kind of evidence",
            ["kind"],
            registry=r,
        )
        self.trials = Counter(
            "clustermap_sidecar_trials",
            "Half-open trials: started, moved to another row, and how they ended "
            "(success, failure, returned: no outcome from any row)",
            ["event"],
            registry=r,
        )
        self.ejected = Gauge(
            "clustermap_sidecar_ejected_nodes", "Nodes ejected right now", registry=r
        )
        self.feedback_rows = Gauge(
            "clustermap_sidecar_feedback_rows",
            "Feedback rows held by live worker processes",
            registry=r,
        )
        self.feedback_garbage = Counter(
            "clustermap_sidecar_feedback_garbage_rows",
            "Feedback rows ignored because their content made no sense",
            registry=r,
        )
        self._last_sync_wall = 0.0
        self.last_sync_age.set_function(self.age)

    def set_quarantined(self, services: Mapping[str, str]) -> None:
        """Replace the quarantine series with ``services`` (name -> reason)."""
        self.quarantined.clear()
        for name, reason in services.items():
            self.quarantined.labels(name, reason[:200]).set(1)
        self.quarantined_services.set(len(services))

    def synced(self, wall: float) -> None:
        self._last_sync_wall = wall
        self.last_sync.set(wall)

    def age(self) -> float:
        return time.time() - self._last_sync_wall if self._last_sync_wall else float("inf")


#: Seconds a metrics connection may sit without sending its request (or reading the answer).
CONNECTION_TIMEOUT: Final = 5.0


class _QuietHandler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT  # per connection: an idle client gives up its thread

    def log_message(self, format: str, *args: Any) -> None:
        pass


#: Connections served at once; more are closed at once rather than queued behind idle ones.
MAX_CONNECTIONS: Final = 128


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    """One thread per connection (at most :data:`MAX_CONNECTIONS`), each with a timeout: an idle
    or slow client cannot hold up a liveness probe."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out or went away: nothing to report, no traceback


def serve(
    metrics: Metrics, host: str, port: int, healthy: Callable[[], tuple[bool, str]]
) -> WSGIServer:
    """Serve /metrics and /healthz from a daemon thread; returns the server (call shutdown()).

    Raises ``OSError`` when the address cannot be bound (the caller says so in one line)."""
    prom = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path == "/healthz":
            ok, why = healthy()
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "text/plain; charset=utf-8")],
            )
            return [(why or "ok").encode() + b"\n"]
        if path == "/metrics":
            return prom(environ, start_response)  # type: ignore[no-any-return]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics or /healthz\n"]

    server = make_server(host, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
