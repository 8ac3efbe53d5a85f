"""Routing by metadata and by zone: which nodes of a service a pick may choose from.

A layer in front of the pickers, pure and without I/O: it turns a service, a subset of meta
pairs and the machine's zone into the restricted :class:`~clustermap.model.Service` that an
ordinary :class:`~clustermap.balance.picker.ServicePicker` then runs on, so every strategy
(weights, panic threshold, ejections, consistent hashing) works unchanged inside a subset or a
zone. The client caches the result per (service version, subset). docs/routing.md is the
user's description of these rules and why they are so.

- **Subset**: the nodes whose meta has every pair. When none of them may receive traffic, the
  service's ``subset_fallback`` decides (Envoy's fallback_policy): ``none`` (NoAvailableNode
  naming the subset), ``any`` (the whole service) or ``default`` (the ``subset_default``
  pairs instead).
- **Zone**: key-less picks stay among the nodes whose meta ``zone`` is the machine's zone while
  at least ``zone_min_healthy`` of them are healthy (not down, draining, of weight 0 or
  ejected), the service (or subset) has at least ``zone_min_cluster_size`` nodes and is not in
  panic mode; otherwise they spill to every zone. Keyed picks ignore zones: consistent hashing
  must give one answer on every machine, in every zone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, NamedTuple

from clustermap.balance.picker import (
    MaglevSource,
    ServicePicker,
    eligible_nodes,
    live_ejections,
    make_picker,
)
from clustermap.errors import InvalidSubset, NoAvailableNode
from clustermap.model import Ejection, Overlay, Service
from clustermap.rules import (
    MAX_META_ENTRIES,
    MAX_META_KEY,
    MAX_META_VALUE,
    ZONE_META,
    Routing,
    check_routing,
    check_zone,
    clip,
)

__all__ = [
    "LOCAL",
    "OFF",
    "SPILLED",
    "Pairs",
    "Route",
    "ZoneDecision",
    "declared_subsets",
    "describe",
    "restrict",
    "route",
    "routing_options",
    "subset_pairs",
    "subset_service",
    "zone_decision",
    "zone_name",
]

#: Zone decisions: no zone routing (the machine has no zone); picks stay in the local zone;
#: picks spill to every zone (``reason`` says why).
OFF: Final = "off"
LOCAL: Final = "local"
SPILLED: Final = "spilled"

Pairs = tuple[tuple[str, str], ...]


def subset_pairs(subset: object) -> Pairs:
    """``subset`` as sorted ``(key, value)`` pairs; :class:`InvalidSubset` unless it is a
    mapping of at most 32 meta keys to strings of meta size (the registry's limits)."""
    if not isinstance(subset, Mapping):
        raise InvalidSubset(
            f"subset must be a mapping of meta keys to strings, not {type(subset).__name__}"
        )
    if len(subset) > MAX_META_ENTRIES:
        raise InvalidSubset(f"subset has {len(subset)} pairs; at most {MAX_META_ENTRIES}")
    for k, v in subset.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidSubset(
                f"subset keys and values must be strings, not {type(k).__name__}: "
                f"{type(v).__name__}"
            )
        if not k or len(k) > MAX_META_KEY:
            raise InvalidSubset(f"subset key {clip(k)} must be 1-{MAX_META_KEY} characters")
        if len(v) > MAX_META_VALUE:
            raise InvalidSubset(f"subset value of {clip(k)} longer than {MAX_META_VALUE}")
    return tuple(sorted(subset.items()))


def describe(pairs: Pairs) -> str:
    """``{k=v, ...}``, for messages (values clipped)."""
    return "{" + ", ".join(f"{k}={clip(v)[1:-1]}" for k, v in pairs) + "}"


def routing_options(meta: Mapping[str, str]) -> Routing:
    """The service's routing options; the defaults if its meta has invalid ones (the server
    and the sidecar refuse those, so only a damaged or foreign map has them)."""
    if not any(k.startswith(("subset_", "zone_")) for k in meta):
        return _DEFAULTS
    try:
        return check_routing(meta)
    except ValueError:
        return _DEFAULTS


_DEFAULTS: Final = Routing()


def zone_name(raw: str) -> str:
    """The machine's zone as the region records it, or "" (no zone routing) if it is not a
    valid zone name: the region is not trusted to steer picks with one."""
    if not raw:
        return ""
    try:
        return check_zone(raw)
    except ValueError:
        return ""


def restrict(service: Service, keep: Sequence[int]) -> Service:
    """``service`` with only the nodes at positions ``keep`` (in map order); what the sidecar
    adds (feedback ids, ejections, slow-start ramps) follows its nodes."""
    overlay = service.overlay
    ramp = service.slow_start
    new = {old: k for k, old in enumerate(keep)} if overlay is not None or ramp is not None else {}
    if ramp is not None:
        ramp = ramp._replace(since=tuple((new[p], t) for p, t in ramp.since if p in new))
    if overlay is not None:
        overlay = Overlay(
            tuple(overlay.ids[k] for k in keep),
            tuple(
                Ejection(new[e.position], e.until_ns, e.reason)
                for e in overlay.ejected
                if e.position in new
            ),
        )
    nodes = service.nodes
    return Service(
        service.name,
        tuple(nodes[k] for k in keep),
        service.strategy,
        service.panic_threshold,
        service.revision,
        service.meta,
        overlay,
        ramp if ramp is not None and ramp.since else None,
    )


def _matching(service: Service, pairs: Pairs) -> list[int]:
    return [k for k, n in enumerate(service.nodes) if all(n.meta.get(a) == b for a, b in pairs)]


def declared_subsets(service: Service) -> list[Pairs]:
    """The subsets ``service`` declares in its meta ``subset_keys`` (Envoy's subset
    selectors), as sorted pairs: for each selector in the order declared, every combination
    of values its nodes have for all of its keys, in sorted order; then the default subset of
    ``subset_fallback=default``. The sidecar publishes their Maglev tables (docs/routing.md)."""
    routing = routing_options(service.meta)
    out: list[Pairs] = []
    for keys in routing.selectors:
        values = {
            tuple(n.meta[k] for k in keys) for n in service.nodes if all(k in n.meta for k in keys)
        }
        out.extend(tuple(zip(keys, v, strict=True)) for v in sorted(values))
    if routing.fallback == "default" and routing.default_subset not in out:
        out.append(routing.default_subset)
    return out


def subset_service(service: Service, pairs: Pairs) -> Service:
    """``service`` restricted to the nodes whose meta has every pair (no fallback)."""
    return restrict(service, _matching(service, pairs))


class ZoneDecision(NamedTuple):
    """Where key-less picks go: ``state`` is OFF, LOCAL or SPILLED; ``reason`` says why in one
    line (cmctl shows it); ``local`` are the positions of the local zone's nodes."""

    zone: str
    state: str
    reason: str
    local: tuple[int, ...] = ()


def zone_decision(service: Service, zone: str, routing: Routing, now_ns: int) -> ZoneDecision:
    """The zone rule of docs/routing.md for ``service`` (already restricted to a subset) on a
    machine in ``zone`` ("" for none), with the ejections live at ``now_ns``."""
    if not zone:
        return ZoneDecision("", OFF, "this machine has no zone")
    nodes = service.nodes
    local = tuple(k for k, n in enumerate(nodes) if n.meta.get(ZONE_META) == zone)
    if not local:
        return ZoneDecision(zone, SPILLED, f"no node in zone {zone}")
    total = len(nodes)
    if total < routing.zone_min_cluster_size:
        return ZoneDecision(
            zone,
            SPILLED,
            f"{total} nodes, fewer than zone_min_cluster_size {routing.zone_min_cluster_size}",
            local,
        )
    ejected = live_ejections(service, now_ns)[0] if service.overlay is not None else frozenset()
    healthy = sum(1 for k, n in enumerate(nodes) if n.healthy and k not in ejected)
    threshold = service.panic_threshold
    if threshold > 0 and healthy / total < threshold:
        return ZoneDecision(
            zone, SPILLED, f"panic mode ({healthy} of {total} nodes healthy)", local
        )
    here = sum(1 for k in local if nodes[k].healthy and k not in ejected)
    shown = f"{here} of {len(local)} nodes healthy in zone {zone}"
    # A small tolerance: 5 of 7 healthy is 0.714..., exactly the default 1/1.4.
    if here == 0 or here < routing.zone_min_healthy * len(local) - 1e-9:
        return ZoneDecision(
            zone,
            SPILLED,
            f"{shown}, under zone_min_healthy {routing.zone_min_healthy:.0%}",
            local,
        )
    return ZoneDecision(zone, LOCAL, shown, local)


class Route(NamedTuple):
    """What the client caches per (service version, subset).

    ``picker`` serves key-less picks (subset and zone applied); ``keyed`` serves keyed picks
    (subset applied, never the zone: a key maps to one node on every machine) and holds the
    service as the subset sees it. They are one object when the zone changes nothing.
    ``subset`` describes the nodes used when a fallback replaced the asked subset, else "".
    """

    picker: ServicePicker
    keyed: ServicePicker
    zone: ZoneDecision
    fallback: str


def route(
    service: Service,
    pairs: Pairs,
    zone: str,
    now_ns: int,
    maglev_source: MaglevSource | None = None,
) -> Route:
    """The pickers for ``service`` inside the subset ``pairs`` (() for none) on a machine in
    ``zone``. Raises :class:`NoAvailableNode` naming the subset when it has no node that may
    receive traffic and the service's fallback does not apply. ``maglev_source`` finds the
    keyed picker's table in the region: the whole service's, or that of a declared subset
    (:func:`declared_subsets`) whose eligible nodes are the same."""
    routing = routing_options(service.meta) if pairs or zone else _DEFAULTS
    base = service
    fallback = ""
    if pairs:
        keep = _matching(service, pairs)
        base = restrict(service, keep)
        if not eligible_nodes(base):
            why = f"service {service.name!r} has no node with {describe(pairs)}" + (
                " that may receive traffic" if keep else ""
            )
            if routing.fallback == "any":
                base, fallback = service, f"any node ({why})"
            elif routing.fallback == "default":
                default = routing.default_subset
                base = restrict(service, _matching(service, default))
                if not eligible_nodes(base):
                    raise NoAvailableNode(f"{why}, nor with its default subset {describe(default)}")
                fallback = f"default subset {describe(default)} ({why})"
            else:
                raise NoAvailableNode(why)
    keyed = make_picker(base, maglev_source)
    decision = zone_decision(base, zone, routing, now_ns)
    picker = keyed
    if decision.state == LOCAL and len(decision.local) < len(base.nodes):
        picker = make_picker(restrict(base, decision.local))
    return Route(picker, keyed, decision, fallback)
