"""Prometheus metrics for cm-server (``--metrics-listen HOST:PORT``, off by default).

State gauges are read from the registry at scrape time (the scrape thread takes the registry
lock briefly, like any RPC); counters are incremented where things happen. Metrics live in their
own :class:`CollectorRegistry`, so importing this module registers nothing globally.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from clustermap.model import parse_address
from clustermap.server.registry import Registry

__all__ = ["ServerMetrics"]


class _StateCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        st = self._registry.status()
        for name, doc, value in (
            ("revision", "Current map revision", st.revision),
            ("services", "Services in the map", st.services),
            ("nodes", "Nodes in the map", st.nodes),
            ("leases", "Live leases", st.leases),
            ("silent_leases", "Leases not renewed for over half their TTL", st.silent_leases),
            ("self_preservation", "1 while lease expiry is held back", int(st.self_preservation)),
            ("ready", "1 once warm-up is over", int(st.ready)),
            ("uptime_seconds", "Seconds since start", st.uptime),
        ):
            yield GaugeMetricFamily(f"clustermap_server_{name}", doc, value=value)
        # with etcd every replica sees (and counts) every expiry: aggregate with max, not sum
        yield CounterMetricFamily(
            "clustermap_server_leases_expired", "Leases expired", value=st.leases_expired
        )


class ServerMetrics:
    def __init__(self, registry: Registry) -> None:
        self.prom = CollectorRegistry()
        self.prom.register(_StateCollector(registry))
        self.polls = Counter(
            "clustermap_server_polls", "Poll answers by kind", ["kind"], registry=self.prom
        )
        self._polls_by_kind: dict[str, Any] = {}
        self.refused = Counter(
            "clustermap_server_auth_refused", "Calls refused for credentials", registry=self.prom
        )
        self.watch_streams = Gauge(
            "clustermap_server_watch_streams", "Watch streams held", registry=self.prom
        )
        self.watch_refused = Counter(
            "clustermap_server_watch_refused",
            "Watch streams refused RESOURCE_EXHAUSTED (--max-watchers)",
            registry=self.prom,
        )

    def on_poll(self, kind: str) -> None:
        """Once per answer, on Watch streams once per message: the labelled child is looked up
        (a lock and a tuple) once per kind, not on every message."""
        child = self._polls_by_kind.get(kind)
        if child is None:
            child = self._polls_by_kind[kind] = self.polls.labels(kind)
        child.inc()

    def on_refused(self) -> None:
        self.refused.inc()

    def on_watch(self, delta: int) -> None:
        """A Watch stream opened (+1), ended (-1) or was refused (0)."""
        if delta:
            self.watch_streams.inc(delta)
        else:
            self.watch_refused.inc()

    def serve(self, listen: str) -> Any:
        host, port = parse_address(listen, allow_zero=True)
        server, _thread = start_http_server(port, host, registry=self.prom)
        return server
