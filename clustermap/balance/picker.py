"""The per-service picker a worker caches per (service, version) and calls on every request.

Design points, each measured in notes/lb-facts.md:

- Everything that depends only on the service (eligible nodes, their canonical order, schedules,
  tables) is computed once; a warm pick is a C-level ``next()`` on an ``itertools.cycle`` or on
  a stream of pre-drawn random choices (:mod:`clustermap.balance.draws`), or one xxh64 and two
  indexes. Tables that cost milliseconds (Maglev, ketama, the weighted schedule) are made on
  first use: most services use one strategy. The Maglev table is preferably not built at all
  but taken from ``maglev_source`` (the region, where the sidecar published it once for every
  worker; see docs/region-format.md), and built here only when that has none that matches.
- Round-robin and weighted round-robin start at a random offset drawn from the module-level
  ``random``, which CPython reseeds in a forked child; :meth:`ServicePicker.after_fork` redraws it
  (and discards pre-drawn random choices), so workers forked from one master do not all send
  their first request to the same node.
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
from array import array
from bisect import bisect_left as _bisect_left
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import cycle
from typing import Final, NamedTuple, Protocol

import xxhash

from clustermap.balance.draws import uniform_stream
from clustermap.balance.hashing import (
    MAGLEV_TABLE_SIZE,
    build_ketama,
    build_maglev,
    canonical_name,
    ketama_hash,
    ketama_name,
    maglev_digest,
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
    "MaglevSource",
    "MaglevTable",
    "ServicePicker",
    "eligible_nodes",
    "live_ejections",
    "make_picker",
    "wants_maglev",
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
    """Where least_request reads machine-wide figures: ``(words, base, capacity, one)`` so that
    ``words[base + id]`` is node ``id``'s expected wait, (calls in flight + 1) x latency, and
    ``words[one]`` is 1 (a node without an id); None if unavailable."""

    def load_view(self) -> tuple[memoryview, int, int, int] | None: ...


_xxh64 = xxhash.xxh64_intdigest
# A bound method of the module-level generator, which CPython reseeds in every forked child.
_random = _random_module.random


class MaglevTable(NamedTuple):
    """A Maglev table made elsewhere (the sidecar), as a worker finds it in the region.

    ``entries[slot]`` is an index into the eligible nodes in canonical order; ``nodes`` and
    ``digest`` (:func:`~clustermap.balance.hashing.maglev_digest`) say which nodes it was built
    over, so a picker uses it only for exactly its own eligible set.
    """

    entries: Sequence[int]
    nodes: int
    digest: int


#: Where a picker finds a published Maglev table: called with the node count and nodes digest
#: (:func:`~clustermap.balance.hashing.maglev_digest`) of its eligible nodes, it returns the
#: table built over those nodes, if the region has one (the whole service's or a declared
#: subset's; docs/region-format.md), else None.
MaglevSource = Callable[[int, int], MaglevTable | None]


def wants_maglev(service: Service) -> bool:
    """Whether keyed picks are expected on ``service``, hashed by Maglev: its default strategy
    is ``consistent_hash``, or its meta says ``hash=maglev`` explicitly. The sidecar publishes a
    table for these (docs/hashing.md); other services build theirs on a first keyed pick."""
    kind = service.meta.get("hash")
    if service.strategy == "consistent_hash":
        return kind is None or kind == "maglev"
    return kind == "maglev"


def eligible_nodes(service: Service) -> tuple[Node, ...]:
    """The nodes picks may go to, in canonical order (the input of every strategy)."""
    return _eligible(service)[0]


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


class _Calls:
    """An endless iterator whose ``next()`` calls ``fn``: stands in for a strategy's iterator
    until its first use builds it, or when there is no node (``fn`` raises)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], Node]) -> None:
        self.fn = fn

    def __iter__(self) -> _Calls:
        return self

    def __next__(self) -> Node:
        return self.fn()


class ServicePicker:
    """Picks nodes of one service version; cheap to call, built once per version per process.

    ``nodes`` are the eligible nodes in canonical order (``host:port`` sorted); ``panic`` says
    whether they include unhealthy ones because the panic threshold applies.
    """

    __slots__ = (
        "_hash",
        "_ketama",
        "_load",
        "_lr_count",
        "_lr_i",
        "_lr_ids",
        "_lr_j",
        "_lr_nodes",
        "_maglev_source",
        "_nodes_list",
        "_random",
        "_rr",
        "_schedule",
        "_why",
        "_wrandom",
        "_wrr",
        "bytes_maglev",
        "default",
        "default_it",
        "default_strategy",
        "ejected",
        "expires_ns",
        "feedback_slots",
        "iters",
        "load_source",
        "maglev",
        "maglev_shared",
        "nodes",
        "panic",
        "service",
        "str_maglev",
    )

    def __init__(
        self,
        service: Service,
        maglev_source: MaglevSource | None = None,
    ) -> None:
        self.service = service
        #: Positions (in ``service.nodes``) of the nodes ejected by feedback, and the wall clock
        #: (ns) at which the first of them returns (0: none); see :class:`ExpiringPicker`.
        self.ejected, self.expires_ns = (
            live_ejections(service, _time_ns()) if service.overlay is not None else (_NONE, 0)
        )
        self.nodes, self.panic, self._why = _eligible(service, self.ejected)
        self._nodes_list = list(self.nodes)
        self._hash = service.meta.get("hash", "maglev")
        #: The Maglev table once the first keyed pick made it, else None: ``maglev[slot]`` is an
        #: index into ``nodes``. A view of the region's pages when ``maglev_shared``.
        self.maglev: Sequence[int] | None = None
        #: ``maglev`` for the client's inlined keyed pick, which assumes a str key; set back to
        #: None by the client on a bytes key (then keyed picks go through consistent_hash).
        self.str_maglev: Sequence[int] | None = None
        #: ``maglev`` for the client's inlined keyed pick once it saw a bytes key (it assumes
        #: bytes keys); set back to None by the client on a str key after that.
        self.bytes_maglev: Sequence[int] | None = None
        self.maglev_shared = False
        self._maglev_source = maglev_source
        self._ketama: tuple[list[int], list[Node]] | None = None
        self._schedule: list[Node] | None = None
        strategy = service.strategy
        # A strategy this client does not know (a newer server's) falls back to round-robin:
        # any eligible node is a correct answer for a non-hash strategy.
        self.default_strategy = strategy if strategy in STRATEGIES else "round_robin"
        no_node = _Calls(self._no_node)
        self._rr: Iterator[Node] = no_node
        self._random: Iterator[Node] = no_node
        self._wrr: Iterator[Node] = _Calls(self._build_weighted)
        self._wrandom: Iterator[Node] = _Calls(self._build_weighted_random)
        #: Where least_request finds the machine-wide in-flight counts (set by the client).
        self.load_source: LoadSource | None = None
        #: The client's cache: host (or ``id(node)``) -> word index of this process's feedback
        #: entry for the node (ClusterMap._feedback_slot).
        self.feedback_slots: dict[str | int, int] | None = None
        self._load: memoryview | None = None
        self._lr_nodes: list[Node] = []
        self._lr_ids: list[int] = []  # word index of each candidate's expected wait
        self._lr_count = 0
        # Pre-drawn indices of least_request's two choices (draws.py), made on first use.
        self._lr_i: Iterator[int] = iter(())
        self._lr_j: Iterator[int] = iter(())
        self.after_fork()

    # -- per-process state -------------------------------------------------------------------

    def after_fork(self) -> None:
        """Redraw the round-robin and weighted start offsets and discard pre-drawn random
        choices (call in a forked child)."""
        nodes = self._nodes_list
        if nodes:
            start = int(_random() * len(nodes))
            self._rr = cycle(nodes[start:] + nodes[:start])
            self._random = uniform_stream(nodes)
        if self._lr_count > 1:
            self._lr_streams()
        self._bind_schedule()

    def _bind_schedule(self) -> None:
        schedule = self._schedule
        if schedule is not None:
            start = int(_random() * len(schedule))
            self._wrr = cycle(schedule[start:] + schedule[:start])
            self._wrandom = uniform_stream(schedule)
        self._bind_default()

    def _bind_default(self) -> None:
        #: Each key-less strategy as an iterator whose ``next()`` is a pick: a C-level call for
        #: the client's hot path (``next(it)`` costs less than calling a bound ``__next__``).
        #: consistent_hash needs a key and goes through :meth:`pick`.
        self.iters: dict[str, Iterator[Node]] = {
            "round_robin": self._rr,
            "random": self._random,
            "weighted": self._wrr,
            "weighted_random": self._wrandom,
        }
        #: The default strategy's iterator, and its ``next`` as a no-argument pick.
        self.default_it: Iterator[Node] = self._default_iter()
        self.default: Callable[[], Node] = self.default_it.__next__

    def _default_name(self) -> str:
        strategy = self.default_strategy
        if strategy not in self.iters and strategy != "least_request":
            return "random"  # consistent_hash without a key: random, as Envoy does
        return strategy

    def _default_iter(self) -> Iterator[Node]:
        name = self._default_name()
        if name == "least_request":  # no stream of its own: each next() is one P2C pick
            return _Calls(self.least_request)
        return self.iters[name]

    def _no_node(self) -> Node:
        raise NoAvailableNode(self._why)

    # -- the hot path ------------------------------------------------------------------------

    def pick(self, key: str | bytes | None = None, strategy: str | None = None) -> Node:
        """Pick a node: by ``strategy``, else by consistent hash if ``key`` is given, else by
        the service's default strategy. A key is ignored by non-hash strategies."""
        if strategy is None:
            if key is None:
                return next(self.default_it)
            return self.consistent_hash(key)
        it = self.iters.get(strategy)
        if it is not None:
            return next(it)
        if strategy == "consistent_hash":
            if key is None:
                raise TypeError("pick(strategy='consistent_hash') needs a key")
            return self.consistent_hash(key)
        if strategy == "least_request":
            return self.least_request()
        raise ValueError(f"unknown strategy {strategy!r} (expected one of {', '.join(STRATEGIES)})")

    def round_robin(self) -> Node:
        """The next node in canonical order, from this process's random start."""
        return next(self._rr)

    def random(self) -> Node:
        """A uniformly random eligible node (from a stream of pre-drawn choices)."""
        return next(self._random)

    def weighted(self) -> Node:
        """The next node of the smooth weighted round-robin schedule."""
        return next(self._wrr)

    def weighted_random(self) -> Node:
        """A random node with probability proportional to its weight: a uniform schedule slot."""
        return next(self._wrandom)

    def consistent_hash(self, key: str | bytes) -> Node:
        """The node owning ``key`` (Maglev unless ``service.meta["hash"]`` says otherwise)."""
        table = self.maglev
        if table is not None:
            return self._maglev_pick(table, key)
        return self._consistent_hash_slow(key)

    def _maglev_pick(self, table: Sequence[int], key: str | bytes) -> Node:
        try:
            return self._nodes_list[
                table[_xxh64(key.encode() if isinstance(key, str) else key) % _M]
            ]
        except IndexError:
            return self._maglev_mismatch(key)

    def least_request(self) -> Node:
        """Power of two choices: of two distinct random nodes, the one with the lower expected
        wait, ``(calls in flight on the whole machine + 1) x peak-EWMA latency``
        (docs/feedback.md). With unequal weights the two are drawn in proportion to weight.
        Without feedback, a random node (P2C with equal costs)."""
        load = self._load
        if load is not None:
            i = next(self._lr_i)
            j = next(self._lr_j)
            if j >= i:
                j += 1
            # Expected wait (Finagle's peak EWMA cost), as the sidecar multiplied it.
            ids = self._lr_ids
            if load[ids[j]] < load[ids[i]]:
                return self._lr_nodes[j]
            return self._lr_nodes[i]
        return self._least_request_slow()

    def _least_request_slow(self) -> Node:
        if not self._lr_count:
            self._build_least_request()
        nodes, count = self._lr_nodes, self._lr_count
        if not count:
            raise NoAvailableNode(self._why)
        if count == 1:
            return nodes[0]
        i = next(self._lr_i)
        j = next(self._lr_j)
        if j >= i:
            j += 1
        load = self._load
        if load is not None:
            ids = self._lr_ids
            if load[ids[j]] < load[ids[i]]:
                return nodes[j]
        return nodes[i]

    def _lr_candidates(self) -> list[Node]:
        """The nodes least_request draws its two choices from: each node once, or with unequal
        weights the weighted schedule (a node as often as its weight)."""
        nodes = self._nodes_list
        if len({n.weight for n in nodes}) > 1:
            if self._schedule is None:
                self._weighted_schedule()
            return self._schedule or nodes
        return nodes

    def _lr_streams(self) -> None:
        """Two exactly uniform streams: ``i`` over the candidates, ``j`` over the others."""
        count = self._lr_count
        self._lr_i = uniform_stream(range(count))
        self._lr_j = uniform_stream(range(count - 1))

    def _build_least_request(self) -> None:
        nodes = self._nodes_list
        if not nodes:
            return
        candidates = self._lr_candidates()
        view = self.load_source.load_view() if self.load_source is not None else None
        overlay = self.service.overlay
        if view is not None and overlay is not None:
            _, base, capacity, one = view
            position = {id(n): k for k, n in enumerate(self.service.nodes)}
            ids = []
            for n in candidates:
                node_id = overlay.ids[position[id(n)]]
                ids.append(base + node_id if 0 <= node_id < capacity else one)
            self._lr_ids = ids
        self._lr_nodes = list(candidates)
        count = len(candidates)
        self._lr_count = count
        if count > 1:
            self._lr_streams()
        if view is not None and overlay is not None and count > 1:
            self._load = view[0]  # last: the fast path runs only once everything is set

    # -- lazy builds -------------------------------------------------------------------------

    def _build_weighted(self) -> Node:
        self._weighted_schedule()
        return next(self._wrr)

    def _build_weighted_random(self) -> Node:
        self._weighted_schedule()
        return next(self._wrandom)

    def _weighted_schedule(self) -> None:
        nodes = self._nodes_list
        if not nodes:
            raise NoAvailableNode(self._why)
        if self._schedule is None:
            self._schedule = [nodes[i] for i in smooth_wrr([n.weight for n in nodes])]
        self._bind_schedule()

    def _maglev_mismatch(self, key: str | bytes) -> Node:
        """A table entry that is not a node index: a shared table not made for these nodes
        (docs/region-format.md says when a reader could see one). Build our own instead."""
        self.str_maglev = None
        self.bytes_maglev = None
        self.maglev = None
        self.maglev_shared = False
        self._maglev_source = None
        return self._consistent_hash_slow(key)

    def _shared_maglev(self) -> Sequence[int] | None:
        """The published table, if there is one and it was built over exactly our nodes."""
        source = self._maglev_source
        if source is None:
            return None
        nodes = self._nodes_list
        digest = maglev_digest([canonical_name(n) for n in nodes], [n.weight for n in nodes])
        found = source(len(nodes), digest)
        if found is None or found.nodes != len(nodes) or len(found.entries) != _M:
            return None
        if found.digest != digest:
            return None
        return found.entries

    def _maglev_table(self) -> Sequence[int]:
        """The published table if it fits our nodes, else one built here."""
        table = self._shared_maglev()
        self.maglev_shared = table is not None
        if table is None:
            nodes = self._nodes_list
            index = build_maglev([canonical_name(n) for n in nodes], [n.weight for n in nodes])
            table = array("B" if len(nodes) <= 256 else "H", index)
        return table

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
            table = self.maglev = self.str_maglev = self._maglev_table()
            return self._maglev_pick(table, key)  # guarded: a bad shared entry falls back
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

    Only services with ejections pay for it (one clock read and two Python calls per pick):
    ``iters`` and ``default_it`` are wrapped in checking iterators. Keyed picks go through
    :meth:`consistent_hash`: ``maglev`` stays None (the table is kept in ``_table``) so that the
    client's inlined table lookup, which cannot check the clock, is skipped. A table the sidecar
    published was built over the nodes without ejections; its digest does not match ours, so
    this picker builds its own (:meth:`ServicePicker._shared_maglev`).
    """

    __slots__ = ("_inner", "_table")

    def __init__(
        self,
        service: Service,
        maglev_source: MaglevSource | None = None,
    ) -> None:
        self._table: Sequence[int] | None = None
        super().__init__(service, maglev_source)

    def _bind_default(self) -> None:
        super()._bind_default()
        self._inner = self.iters
        if self.expires_ns:
            self.iters = {name: _Calls(partial(self._checked, name)) for name in self._inner}
            self.default_it = self._default_iter()
            self.default = self.default_it.__next__

    def _checked(self, name: str) -> Node:
        if self.expires_ns and _time_ns() >= self.expires_ns:
            self._expire()
        return next(self._inner[name])

    def _expire(self) -> None:
        """Rebuild in place with the ejections still running at the current time."""
        source = self.load_source
        self.__init__(self.service, self._maglev_source)  # type: ignore[misc]
        self.load_source = source

    def pick(self, key: str | bytes | None = None, strategy: str | None = None) -> Node:
        if self.expires_ns and _time_ns() >= self.expires_ns:
            self._expire()
        return super().pick(key, strategy)

    def least_request(self) -> Node:
        if self.expires_ns and _time_ns() >= self.expires_ns:
            self._expire()
        return super().least_request()

    def consistent_hash(self, key: str | bytes) -> Node:
        if self.expires_ns and _time_ns() >= self.expires_ns:
            self._expire()
        return self._consistent_hash_slow(key)

    def _consistent_hash_slow(self, key: str | bytes) -> Node:
        table = self._table
        if table is None and self._hash == "maglev" and self._nodes_list:
            table = self._table = self._maglev_table()
        if table is not None:
            return self._maglev_pick(table, key)
        return super()._consistent_hash_slow(key)  # ketama, or an error

    def _maglev_mismatch(self, key: str | bytes) -> Node:
        self._table = None
        return super()._maglev_mismatch(key)


def make_picker(service: Service, maglev_source: MaglevSource | None = None) -> ServicePicker:
    """The picker for ``service``: a :class:`~clustermap.balance.slowstart.RampingPicker` while
    nodes are in slow start, an :class:`ExpiringPicker` when it has ejected nodes.
    ``maglev_source`` gives the table the sidecar published, if any (see ServicePicker)."""
    ramp = service.slow_start
    if ramp is not None:  # nodes in slow start (docs/slow-start.md)
        from clustermap.balance.slowstart import RampingPicker, ramping

        if ramping(ramp, _time_ns()):
            return RampingPicker(service, maglev_source)
    overlay = service.overlay
    if overlay is not None and overlay.ejected:
        return ExpiringPicker(service, maglev_source)
    return ServicePicker(service, maglev_source)
