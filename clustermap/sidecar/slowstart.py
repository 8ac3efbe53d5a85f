"""When each node's slow start began: the sidecar's clock for every worker's ramp.

The sidecar is the one process that sees every version of the map on its machine, so it decides
when a node *joined* (an address new to a service the sidecar already had) or *came back up*
(a node that may receive traffic again: status back to ``up``, weight back above 0, or the end
of an outlier ejection), and publishes those wall-clock times with the service
(:class:`clustermap.model.SlowStart`, docs/slow-start.md). Workers only compute the ramp.

A service the sidecar sees for the first time does not ramp (its nodes are all equally new:
Envoy ramps hosts added to a cluster that is already up). A restarted sidecar takes the ramps
in progress back from the region (:meth:`RampClock.seed`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from clustermap.model import Service, SlowStart
from clustermap.rules import SLOW_START_AGGRESSION, SLOW_START_MIN_WEIGHT_PERCENT, check_slow_start

__all__ = ["RampClock"]

_Key = tuple[str, int]


class RampClock:
    """Ramp start times per (service, node address), and the services decorated with them.

    ``default_window_s`` applies to services whose meta says nothing (``slow_start=`` in a
    service's meta overrides it, ``slow_start=0`` turns it off); 0 means off by default.
    """

    def __init__(self, default_window_s: float = 0.0) -> None:
        self.default_window_s = default_window_s
        self._since: dict[str, dict[_Key, int]] = {}

    def seed(self, services: Iterable[Service]) -> None:
        """Take over the ramps published in a region (a restarted sidecar)."""
        for s in services:
            ramp = s.slow_start
            if ramp is not None:
                known = self._since.setdefault(s.name, {})
                for position, since in ramp.since:
                    known[s.nodes[position].key] = since

    def observe(self, old: Service | None, new: Service, now_ns: int) -> None:
        """``new`` replaces ``old`` (None: a service first seen): start the ramp of every node
        that may receive traffic in ``new`` and could not in ``old``."""
        if old is None:
            return
        before = {n.key for n in old.nodes if n.healthy}
        known = self._since.setdefault(new.name, {})
        present = set()
        for n in new.nodes:
            present.add(n.key)
            if n.healthy and n.key not in before:
                known[n.key] = now_ns
        for key in [k for k in known if k not in present]:
            del known[key]

    def forget(self, name: str) -> None:
        self._since.pop(name, None)

    def window_ns(self, service: Service) -> tuple[int, float, float]:
        """(window ns, aggression, min weight as a fraction) of ``service``."""
        try:
            cfg = check_slow_start(service.meta)
        except ValueError:  # validated upstream; never let a bad option stop a publish
            return (
                int(self.default_window_s * 1e9),
                SLOW_START_AGGRESSION,
                SLOW_START_MIN_WEIGHT_PERCENT / 100,
            )
        window = self.default_window_s if cfg.window_s is None else cfg.window_s
        return int(window * 1e9), cfg.aggression, cfg.min_weight_percent / 100.0

    def decorate(self, service: Service, now_ns: int) -> Service:
        """``service`` with the ramps still running at ``now_ns`` (or with none). A node ejected
        by feedback (its overlay) ramps from the end of its ejection."""
        window, aggression, min_weight = self.window_ns(service)
        known = self._since.get(service.name)
        overlay = service.overlay
        if window <= 0 or (not known and (overlay is None or not overlay.ejected)):
            return service if service.slow_start is None else replace(service, slow_start=None)
        known = self._since.setdefault(service.name, {})
        if overlay is not None:
            for e in overlay.ejected:
                key = service.nodes[e.position].key
                known[key] = max(known.get(key, 0), e.until_ns)
        since = []
        for position, n in enumerate(service.nodes):
            t = known.get(n.key)
            if t is not None and now_ns < t + window:
                since.append((position, t))
        for key in [k for k, t in known.items() if now_ns >= t + window]:
            del known[key]
        if not since:
            return service if service.slow_start is None else replace(service, slow_start=None)
        return replace(
            service,
            slow_start=SlowStart(window, aggression, min_weight, tuple(since)),
        )
