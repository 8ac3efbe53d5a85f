"""Prometheus metrics and ``/healthz`` for the sidecar, on an optional HOST:PORT."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

__all__ = ["Metrics", "serve"]


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
        self.ejections = Counter(
            "clustermap_sidecar_ejections",
            "Nodes ejected from callers' feedback, by kind of evidence",
            ["kind"],
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

    def synced(self, wall: float) -> None:
        self._last_sync_wall = wall
        self.last_sync.set(wall)

    def age(self) -> float:
        return time.time() - self._last_sync_wall if self._last_sync_wall else float("inf")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(
    metrics: Metrics, host: str, port: int, healthy: Callable[[], tuple[bool, str]]
) -> WSGIServer:
    """Serve /metrics and /healthz from a daemon thread; returns the server (call shutdown())."""
    prom = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok, why = healthy()
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "text/plain; charset=utf-8")],
            )
            return [(why or "ok").encode() + b"\n"]
        return prom(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(host, port, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
