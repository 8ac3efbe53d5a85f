"""The per-service picker a worker caches per (service, version) and calls on every request.

Design points, each measured in notes/lb-facts.md:

- Everything that depends only on the service (eligible nodes, their canonical order, schedules,
  tables) is computed once; a warm pick is a C-level ``next()`` on an ``itertools.cycle``, one
  ``getrandbits()`` and an index, or one xxh64 and an index. Tables that cost milliseconds
  (Maglev, ketama, the weighted schedule) are built on first use: most services use one strategy.
- Round-robin and weighted round-robin start at a random offset drawn from the module-level
  ``random``, which CPython reseeds in a forked child; :meth:`ServicePicker.after_fork` redraws it,
  so workers forked from one master do not all send their first request to the same node.
- No locks: ``next()`` on a cycle is a single C call under the GIL, so concurrent threads and
  greenlets never see a torn state (each pick advances the shared cycle by exactly one; a
  free-threaded build might skip or repeat a step, which round-robin tolerates). A lazy build may
  run twice when two threads race on the first pick; both build the same table and the last
  assignment wins. Lazily set fields are published table first, so a reader never sees a bound
  without its table.
"""

from __future__ import annotations

import random as _random_module
import time
from bisect import bisect_left as _bisect_left
from collections.abc import Callable
from itertools import cycle
from typing import Final, Protocol

import xxhash

from clustermap.balance.hashing import (
    MAGLEV_TABLE_SIZE,
    build_ketama,
    build_maglev,
    canonical_name,
    ketama_hash,
    ketama_name,
)
from clustermap.balance.schedule import smooth_wrr
from clustermap.errors import NoAvailableNode
from clustermap.feedback.layout import MAX_EJECTION_S
from clustermap.model import DOWN, DRAIN, UP, Node, Service

__all__ = [
    "HASHES",
    "STRATEGIES",
    "ExpiringPicker",
    "LoadSource",
    "ServicePicker",
    "live_ejections",
    "make_picker",
]

#: Strategy names :meth:`ServicePicker.pick` accepts: model.STRATEGIES plus ``weighted_random``.
#: ``least_request`` needs the feedback files (docs/feedback.md) and is per pick only.
STRATEGIES: Final = (
    "round_robin",
    "random",
    "weighted",
    "weighted_random",
    "consistent_hash",
    "least_request",
)

#: Values of ``service.meta["hash"]`` selecting the consistent-hash algorithm (absent: maglev).
HASHES: Final = ("maglev", "ketama", "ketama_libmemcached")

_M: Final = MAGLEV_TABLE_SIZE
_NONE: Final[frozenset[int]] = frozenset()
_time_ns = time.time_ns


class LoadSource(Protocol):
    """Where least_request reads machine-wide figures: ``(words, base, capacity, zero, one)``
    so that ``words[base + id]`` is node ``id``'s calls in flight, ``words[base + capacity +
    id]`` its latency, ``words[zero]`` is 0 and ``words[one]`` is 1; None if unavailable."""

    def load_view(self) -> tuple[memoryview, int, int, int, int] | None: ...


_xxh64 = xxhash.xxh64_intdigest
# Bound methods of the module-level generator, which CPython reseeds in every forked child.
_random = _random_module.random
_getrandbits = _random_module.getrandbits
#: Extra random bits beyond ceil(log2(n)): a draw is rejected (and redrawn) with p < 1/256.
_SLACK_BITS: Final = 8


def _uniform_params(n: int) -> tuple[int, int]:
    """(bits, limit) for an exactly uniform index: ``x = getrandbits(bits)``, accepted when
    ``x < limit`` (a multiple of ``n``), index ``x % n``. ``limit`` is 0 when ``n`` is 0."""
    bits = max(n - 1, 0).bit_length() + _SLACK_BITS
    return bits, ((1 << bits) // n * n) if n else 0


def _rank(node: Node) -> tuple[int, str, list[tuple[str, str]]]:
    return (-node.weight, node.status, sorted(node.meta.items()))


def live_ejections(service: Service, now_ns: int) -> tuple[frozenset[int], int]:
    """(positions of the nodes ejected at ``now_ns``, wall-clock ns of the first return; 0 if
    none). An ``until`` beyond :data:`MAX_EJECTION_S` from now is garbage and ignored."""
    overlay = service.overlay
    if overlay is None or not overlay.ejected:
        return frozenset(), 0
    horizon = now_ns + MAX_EJECTION_S * 1_000_000_000
    live = [e for e in overlay.ejected if now_ns < e.until_ns <= horizon]
    if not live:
        return frozenset(), 0
    return frozenset(e.position for e in live), min(e.until_ns for e in live)


def _eligible(
    service: Service, ejected: frozenset[int] = frozenset()
) -> tuple[tuple[Node, ...], bool, str]:
    """The nodes picks may go to, in canonical order; whether panic mode applies; why if none.

    Ejected nodes (positions in ``service.nodes``) count as unhealthy, so the panic threshold
    still applies; an ejection that would leave no node at all is ignored (docs/feedback.md).
    """
    if ejected:
        unique, panic, why = _eligible_among(service, ejected)
        if unique:
            return unique, panic, why
    return _eligible_among(service, frozenset())


def _eligible_among(
    service: Service, ejected: frozenset[int]
) -> tuple[tuple[Node, ...], bool, str]:
    nodes = service.nodes
    total = len(nodes)
    if ejected:
        healthy = [n for k, n in enumerate(nodes) if n.healthy and k not in ejected]
    else:
        healthy = [n for n in nodes if n.healthy]
    panic = False
    chosen = healthy
    threshold = service.panic_threshold
    if threshold > 0 and total and len(healthy) / total < threshold:
        panic = True
        chosen = [n for n in nodes if n.weight > 0 and n.status in (UP, DOWN)]
    # Two entries with one address are one node (model.Node.key); keep the heaviest, then a
    # fixed order of the remaining fields, so the choice does not depend on map order. The
    # tie-break key is built only on such a collision: this runs once per service version in
    # every worker, on the path of the first pick after a change.
    by_name: dict[str, Node] = {}
    for node in chosen:
        name = canonical_name(node)
        other = by_name.get(name)
        if other is None or _rank(node) < _rank(other):
            by_name[name] = node
    unique = [by_name[name] for name in sorted(by_name)]
    why = ""
    if not unique:
        if not total:
            why = f"service {service.name!r} has no nodes"
        else:
            down = sum(1 for n in nodes if n.status == DOWN)
            drain = sum(1 for n in nodes if n.status == DRAIN)
            zero = sum(1 for n in nodes if n.status == UP and n.weight <= 0)
            why = (
                f"service {service.name!r} has no node that may receive traffic "
                f"({total} nodes: {down} down, {drain} draining, {zero} up with weight 0"
                f"{', panic threshold in effect' if panic else ''})"
            )
    return tuple(unique), panic, why


class ServicePicker:
    """Picks nodes of one service version; cheap to call, built once per version per process.

    ``nodes`` are the eligible nodes in canonical order (``host:port`` sorted); ``panic`` says
    whether they include unhealthy ones because the panic threshold applies.
    """

    __slots__ = (
        "_bits",
        "_count",
        "_default",
        "_hash",
        "_ketama",
        "_limit",
        "_load",
        "_lr_bits",
        "_lr_bits2",
        "_lr_count",
        "_lr_count2",
        "_lr_ids",
        "_lr_lat",
        "_lr_limit",
        "_lr_limit2",
        "_lr_nodes",
        "_nodes_list",
        "_rr_next",
        "_schedule",
        "_wbits",
        "_wcount",
        "_why",
        "_wlimit",
        "_wrr_next",
        "default",
        "default_strategy",
        "ejected",
        "expires_ns",
        "feedback_slots",
        "load_source",
        "maglev",
        "nodes",
        "panic",
        "service",
    )

    def __init__(self, service: Service) -> None:
        self.service = service
        #: Positions (in ``service.nodes``) of the nodes ejected by feedback, and the wall clock
        #: (ns) at which the first of them returns (0: none); see :class:`ExpiringPicker`.
        self.ejected, self.expires_ns = (
            live_ejections(service, _time_ns()) if service.overlay is not None else (_NONE, 0)
        )
        self.nodes, self.panic, self._why = _eligible(service, self.ejected)
        self._nodes_list = list(self.nodes)
        self._count = len(self._nodes_list)
        self._bits, self._limit = _uniform_params(self._count)
        self._hash = service.meta.get("hash", "maglev")
        #: The Maglev table (node per slot) once the first keyed pick built it, else None.
        self.maglev: list[Node] | None = None
        self._ketama: tuple[list[int], list[Node]] | None = None
        self._schedule: list[Node] | None = None
        self._wbits = self._wcount = self._wlimit = 0  # set when the schedule is built
        strategy = service.strategy
        # A strategy this client does not know (a newer server's) falls back to round-robin:
        # any eligible node is a correct answer for a non-hash strategy.
        self.default_strategy = strategy if strategy in STRATEGIES else "round_robin"
        self._rr_next: Callable[[], Node] = self._no_node
        self._wrr_next: Callable[[], Node] = self._build_weighted
        self._default: Callable[[], Node] | None = self._no_node
        #: Where least_request finds the machine-wide in-flight counts (set by the client).
        self.load_source: LoadSource | None = None
        #: The client's cache: ``id(node)`` -> word index of this process's feedback entry.
        self.feedback_slots: dict[int, int] | None = None
        self._load: memoryview | None = None
        self._lr_nodes: list[Node] = []
        self._lr_ids: list[int] = []
        self._lr_lat: list[int] = []
        self._lr_bits = self._lr_limit = self._lr_count = 0
        self._lr_bits2 = self._lr_limit2 = self._lr_count2 = 0
        self.after_fork()

    # -- per-process state -------------------------------------------------------------------

    def after_fork(self) -> None:
        """Redraw the round-robin and weighted start offsets (call in a forked child)."""
        nodes = self._nodes_list
        if nodes:
            start = int(_random() * len(nodes))
            self._rr_next = cycle(nodes[start:] + nodes[:start]).__next__
        schedule = self._schedule
        if schedule is not None:
            start = int(_random() * len(schedule))
            self._wrr_next = cycle(schedule[start:] + schedule[:start]).__next__
        self._bind_default()

    def _bind_default(self) -> None:
        strategy = self.default_strategy
        if not self._nodes_list:
            self._default = self._no_node
        elif strategy == "round_robin":
            self._default = self._rr_next
        elif strategy == "weighted":
            self._default = self._wrr_next
        elif strategy == "weighted_random":
            self._default = self.weighted_random
        else:  # random, and consistent_hash without a key (Envoy picks a random host)
            self._default = None  # pick() inlines random()
        #: The no-argument pick of the default strategy, as one call (the client's hot path).
        self.default: Callable[[], Node] = self._default or self.random

    def _no_node(self) -> Node:
        raise NoAvailableNode(self._why)

    # -- the hot path ------------------------------------------------------------------------

    def pick(self, key: str | bytes | None = None, strategy: str | None = None) -> Node:
        """Pick a node: by ``strategy``, else by consistent hash if ``key`` is given, else by
        the service's default strategy. A key is ignored by non-hash strategies."""
        if strategy is None:
            if key is None:
                default = self._default
                if default is not None:
                    return default()
                x = _getrandbits(self._bits)  # random, inlined: saves a Python call
                if x < self._limit:
                    return self._nodes_list[x % self._count]
                return self._random_slow()
            table = self.maglev
            if table is not None:
                if isinstance(key, str):
                    key = key.encode()
                return table[_xxh64(key) % _M]
            return self._consistent_hash_slow(key)
        # Explicit strategies inline, most common first: each saves a Python call.
        if strategy == "round_robin":
            return self._rr_next()
        if strategy == "random":
            x = _getrandbits(self._bits)
            if x < self._limit:
                return self._nodes_list[x % self._count]
            return self._random_slow()
        if strategy == "weighted":
            return self._wrr_next()
        if strategy == "consistent_hash":
            if key is None:
                raise TypeError("pick(strategy='consistent_hash') needs a key")
            return self.consistent_hash(key)
        if strategy == "weighted_random":
            return self.weighted_random()
        if strategy == "least_request":
            return self.least_request()
        raise ValueError(f"unknown strategy {strategy!r} (expected one of {', '.join(STRATEGIES)})")

    def round_robin(self) -> Node:
        """The next node in canonical order, from this process's random start."""
        return self._rr_next()

    def random(self) -> Node:
        """A uniformly random eligible node.

        ``getrandbits`` plus a rejected draw now and then is exactly uniform and, at ~60 ns,
        faster than ``nodes[int(random() * n)]`` (``int(float)`` alone costs ~50 ns)."""
        x = _getrandbits(self._bits)
        if x < self._limit:
            return self._nodes_list[x % self._count]
        return self._random_slow()

    def _random_slow(self) -> Node:
        limit = self._limit
        if not limit:
            raise NoAvailableNode(self._why)
        bits = self._bits
        x = _getrandbits(bits)
        while x >= limit:
            x = _getrandbits(bits)
        return self._nodes_list[x % self._count]

    def weighted(self) -> Node:
        """The next node of the smooth weighted round-robin schedule."""
        return self._wrr_next()

    def weighted_random(self) -> Node:
        """A random node with probability proportional to its weight: a uniform schedule slot."""
        x = _getrandbits(self._wbits)
        if x < self._wlimit:
            return self._schedule[x % self._wcount]  # type: ignore[index]
        return self._weighted_random_slow()

    def _weighted_random_slow(self) -> Node:
        schedule = self._schedule
        if schedule is None:
            schedule = self._weighted_schedule()
        bits, limit, count = self._wbits, self._wlimit, self._wcount
        x = _getrandbits(bits)
        while x >= limit:
            x = _getrandbits(bits)
        return schedule[x % count]

    def consistent_hash(self, key: str | bytes) -> Node:
        """The node owning ``key`` (Maglev unless ``service.meta["hash"]`` says otherwise)."""
        table = self.maglev
        if table is not None:
            if isinstance(key, str):
                key = key.encode()
            return table[_xxh64(key) % _M]
        return self._consistent_hash_slow(key)

    def least_request(self) -> Node:
        """Power of two choices: of two distinct random nodes, the one with the lower expected
        wait, ``(calls in flight on the whole machine + 1) x peak-EWMA latency``
        (docs/feedback.md). With unequal weights the two are drawn in proportion to weight.
        Without feedback, a random node (P2C with equal costs)."""
        load = self._load
        if load is not None:
            x = _getrandbits(self._lr_bits)
            y = _getrandbits(self._lr_bits2)
            if x < self._lr_limit and y < self._lr_limit2:
                i = x % self._lr_count
                j = y % self._lr_count2
                if j >= i:
                    j += 1
                # Expected wait (Finagle's peak EWMA cost): latency x (calls in flight + 1).
                ids, lat = self._lr_ids, self._lr_lat
                if (load[ids[j]] + 1) * load[lat[j]] < (load[ids[i]] + 1) * load[lat[i]]:
                    return self._lr_nodes[j]
                return self._lr_nodes[i]
        return self._least_request_slow()

    def _least_request_slow(self) -> Node:
        if not self._lr_count:
            self._build_least_request()
        nodes, count = self._lr_nodes, self._lr_count
        if not count:
            raise NoAvailableNode(self._why)
        i = self._draw(self._lr_bits, self._lr_limit, count)
        if count == 1:
            return nodes[0]
        j = self._draw(self._lr_bits2, self._lr_limit2, count - 1)
        if j >= i:
            j += 1
        load = self._load
        if load is not None:
            ids, lat = self._lr_ids, self._lr_lat
            if (load[ids[j]] + 1) * load[lat[j]] < (load[ids[i]] + 1) * load[lat[i]]:
                return nodes[j]
        return nodes[i]

    @staticmethod
    def _draw(bits: int, limit: int, count: int) -> int:
        x = _getrandbits(bits)
        while x >= limit:
            x = _getrandbits(bits)
        return x % count

    def _build_least_request(self) -> None:
        nodes = self._nodes_list
        if not nodes:
            return
        candidates = nodes
        if len({n.weight for n in nodes}) > 1:
            candidates = self._schedule or self._weighted_schedule()
        view = self.load_source.load_view() if self.load_source is not None else None
        overlay = self.service.overlay
        if view is not None and overlay is not None:
            _, base, capacity, zero, one = view
            position = {id(n): k for k, n in enumerate(self.service.nodes)}
            ids, lat = [], []
            for n in candidates:
                node_id = overlay.ids[position[id(n)]]
                known = 0 <= node_id < capacity
                ids.append(base + node_id if known else zero)
                lat.append(base + capacity + node_id if known else one)
            self._lr_ids, self._lr_lat = ids, lat
        self._lr_nodes = list(candidates)
        count = len(candidates)
        self._lr_bits, self._lr_limit = _uniform_params(count)
        self._lr_bits2, self._lr_limit2 = _uniform_params(count - 1)
        self._lr_count, self._lr_count2 = count, count - 1
        if view is not None and overlay is not None and count > 1:
            self._load = view[0]  # last: the fast path runs only once everything is set

    # -- lazy builds -------------------------------------------------------------------------

    def _weighted_schedule(self) -> list[Node]:
        nodes = self._nodes_list
        if not nodes:
            raise NoAvailableNode(self._why)
        schedule = [nodes[i] for i in smooth_wrr([n.weight for n in nodes])]
        self._schedule = schedule
        self._wcount = len(schedule)
        self._wbits, self._wlimit = _uniform_params(len(schedule))
        return schedule

    def _build_weighted(self) -> Node:
        schedule = self._schedule
        if schedule is None:
            schedule = self._weighted_schedule()
        start = int(_random() * len(schedule))
        self._wrr_next = cycle(schedule[start:] + schedule[:start]).__next__
        self._bind_default()
        return self._wrr_next()

    def _consistent_hash_slow(self, key: str | bytes) -> Node:
        ring = self._ketama
        if ring is not None:
            points, owner_nodes = ring
            i = _bisect_left(points, ketama_hash(key))
            return owner_nodes[i if i < len(points) else 0]
        nodes = self._nodes_list
        if not nodes:
            raise NoAvailableNode(self._why)
        kind = self._hash
        if kind == "maglev":
            names = [canonical_name(n) for n in nodes]
            index = build_maglev(names, [n.weight for n in nodes])
            table = list(map(nodes.__getitem__, index))
            self.maglev = table
            return table[_xxh64(key.encode() if isinstance(key, str) else key) % _M]
        if kind in ("ketama", "ketama_libmemcached"):
            style = "libmemcached" if kind == "ketama_libmemcached" else "ketama"
            points, owners = build_ketama(
                [ketama_name(n, style) for n in nodes], [n.weight for n in nodes], style
            )
            owner_nodes = list(map(nodes.__getitem__, owners))
            self._ketama = (points, owner_nodes)
            i = _bisect_left(points, ketama_hash(key))
            return owner_nodes[i if i < len(points) else 0]
        raise ValueError(
            f"service {self.service.name!r}: unknown meta hash={kind!r} "
            f"(expected one of {', '.join(HASHES)})"
        )


class ExpiringPicker(ServicePicker):
    """The picker of a service with ejected nodes: every pick first reads the clock, so the
    ejections end on time even when no sidecar is left to republish the service.

    Only services with ejections pay for it (one clock read and one Python call per pick). Keyed
    picks go through :meth:`consistent_hash`: ``maglev`` stays None so that the client's inlined
    table lookup, which cannot check the clock, is skipped.
    """

    __slots__ = ("_inner", "_table")

    def __init__(self, service: Service) -> None:
        self._table: list[Node] | None = None
        super().__init__(service)

    def _bind_default(self) -> None:
        super()._bind_default()
        self._inner = self.default
        if self.expires_ns:
            self.default = self._checked_default

    def _checked_default(self) -> Node:
        if _time_ns() >= self.expires_ns:
            self._expire()
        return self._inner()

    def _expire(self) -> None:
        """Rebuild in place with the ejections still running at the current time."""
        source = self.load_source
        self.__init__(self.service)  # type: ignore[misc]
        self.load_source = source

    def pick(self, key: str | bytes | None = None, strategy: str | None = None) -> Node:
        if self.expires_ns and _time_ns() >= self.expires_ns:
            self._expire()
        return super().pick(key, strategy)

    def consistent_hash(self, key: str | bytes) -> Node:
        if self.expires_ns and _time_ns() >= self.expires_ns:
            self._expire()
        return self._consistent_hash_slow(key)

    def _consistent_hash_slow(self, key: str | bytes) -> Node:
        table = self._table
        if table is not None:
            return table[_xxh64(key.encode() if isinstance(key, str) else key) % _M]
        node = super()._consistent_hash_slow(key)
        self._table, self.maglev = self.maglev, None
        return node


def make_picker(service: Service) -> ServicePicker:
    """The picker for ``service``: an :class:`ExpiringPicker` when it has ejected nodes."""
    overlay = service.overlay
    if overlay is not None and overlay.ejected:
        return ExpiringPicker(service)
    return ServicePicker(service)
