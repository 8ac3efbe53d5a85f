"""Slow start: a node that joined or came back up ramps its weight over a window, as Envoy does.

The ramp (pure, :func:`ramp_factor`) is Envoy's: ``max(min_weight, time_factor ** (1 /
aggression))`` with ``time_factor = max(elapsed, 1 s) / window``. The clock is the region's:
the sidecar publishes when each ramp started (:class:`clustermap.model.SlowStart`), so every
worker on the machine ramps together.

A worker never rebuilds a picker per pick. :class:`RampingPicker` serves round_robin and
weighted picks from a chain of C iterators, like a plain picker; every :data:`CHUNK` picks the
chain calls ``RampingPicker._chunk``, which reads the clock and, only when a node's weight
moved to another of the ramp's :data:`STEPS` levels, rebuilds the schedule: :data:`STEPS`
rounds of the plain schedule in which a ramping node keeps only its share of its slots
(:func:`ramp_schedule`, O(length), no simulation). So a warm pick stays O(1) (a C ``next()``
plus one Python call per :data:`CHUNK` picks), and a ramp rebuilds each schedule at most
``STEPS`` times. least_request's pick is unchanged: one of its two pre-drawn index streams
calls back every :data:`CHUNK` draws to read the clock, and its candidates are rebuilt on the
same levels. When the last ramp ends, the picker rebinds its plain iterators
in place: afterwards it costs what a plain picker costs.
random, weighted_random and consistent_hash do not ramp (Envoy ramps round robin and least
request only; a hash ring that moved keys as weights ramp would defeat affinity).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from itertools import chain, islice
from typing import Final

from clustermap.balance.picker import (
    ExpiringPicker,
    MaglevSource,
    ServicePicker,
    _Calls,
    _random,
    _time_ns,
)
from clustermap.balance.schedule import smooth_wrr
from clustermap.feedback.layout import MAX_EJECTION_S
from clustermap.model import Node, Service, SlowStart

__all__ = [
    "CHUNK",
    "STEPS",
    "RampingPicker",
    "ramp_counts",
    "ramp_factor",
    "ramp_schedule",
    "ramping",
]

#: Weight levels of a ramp: over STEPS rounds of the plain schedule a ramping node keeps
#: ``floor(slots * factor * STEPS)`` of its ``slots * STEPS`` slots (never fewer than 1), so a
#: schedule is rebuilt at most this many times per ramp.
STEPS: Final = 20
#: Picks served between two reads of the clock during a ramp.
CHUNK: Final = 256
#: A ramp that starts further ahead than the longest ejection is garbage, and ignored.
_HORIZON_NS: Final = MAX_EJECTION_S * 1_000_000_000


def ramp_factor(elapsed_s: float, window_s: float, aggression: float, min_weight: float) -> float:
    """The share of its weight a node has ``elapsed_s`` seconds into its ramp (Envoy's rule):
    ``max(min_weight, (max(elapsed_s, 1) / window_s) ** (1 / aggression))``, and 1 from the end
    of the window on."""
    if elapsed_s >= window_s:
        return 1.0
    time_factor = max(elapsed_s, 1.0) / window_s
    factor: float = time_factor ** (1.0 / aggression)
    return min(1.0, max(min_weight, factor))


def ramping(ramp: SlowStart, now_ns: int) -> bool:
    """Whether any ramp of ``ramp`` is still running at ``now_ns``."""
    window = ramp.window_ns
    return any(now_ns < t + window and t <= now_ns + _HORIZON_NS for _, t in ramp.since)


def ramp_counts(
    counts: dict[int, int],
    ramps: Sequence[tuple[int, int]],
    ramp: SlowStart,
    now_ns: int,
    rounds: int = STEPS,
) -> dict[int, int]:
    """For each ``(i, since_ns)`` of ``ramps``, how many of its ``counts[i] * STEPS``
    appearances in :data:`STEPS` rounds of a schedule node ``i`` keeps at ``now_ns``:
    ``max(1, floor(counts[i] * factor * STEPS))`` (all of them once its ramp is over)."""
    window_s = ramp.window_ns / 1e9
    out = {}
    for i, since in ramps:
        f = ramp_factor((now_ns - since) / 1e9, window_s, ramp.aggression, ramp.min_weight)
        out[i] = max(1, int(counts[i] * f * rounds))
    return out


def ramp_schedule(base: Sequence[int], kept: dict[int, int], rounds: int = STEPS) -> list[int]:
    """:data:`STEPS` rounds of the schedule ``base`` (node indices) in which node ``i`` of
    ``kept`` keeps only ``kept[i]`` of its appearances, spread evenly over the rounds.

    O(length) with no simulation: a ramping node's weight changes only its own slots, so a
    level change costs about a millisecond per thousand slots (docs/slow-start.md).
    """
    total = {i: base.count(i) * rounds for i in kept}
    masks = {
        i: iter([(t * m) // total[i] != ((t + 1) * m) // total[i] for t in range(total[i])])
        for i, m in kept.items()
    }
    return [i for i in list(base) * rounds if i not in masks or next(masks[i])]


class RampingPicker(ExpiringPicker):
    """The picker of a service with nodes in slow start (and possibly ejected nodes)."""

    __slots__ = ("_bases", "_chains", "_lr_levels", "_ramps", "_state")

    def __init__(
        self,
        service: Service,
        maglev_source: MaglevSource | None = None,
    ) -> None:
        self._ramps: list[tuple[int, int]] = []
        self._chains: tuple[Iterator[Node], Iterator[Node]] | None = None
        # per strategy ("rr", "w"): its ramp schedule, and its plain schedule with each ramping
        # node's count in it
        self._state: dict[str, _Schedule] = {}
        self._bases: dict[str, tuple[list[int], dict[int, int]]] = {}
        self._lr_levels: dict[int, int] | None = None
        super().__init__(service, maglev_source)

    # -- binding ------------------------------------------------------------------------------

    def after_fork(self) -> None:
        super().after_fork()
        self._bind_ramps()

    def _bind_ramps(self) -> None:
        ramp = self.service.slow_start
        nodes = self._nodes_list
        now = _time_ns()
        self._ramps = []
        if ramp is not None and len(nodes) > 1:
            index = {id(n): i for i, n in enumerate(nodes)}
            window = ramp.window_ns
            for position, since in ramp.since:
                i = index.get(id(self.service.nodes[position]))
                if i is not None and now < since + window and since <= now + _HORIZON_NS:
                    self._ramps.append((i, since))
        self._state = {}
        self._bases = {}
        self._lr_levels = None
        if not self._ramps:
            if self._chains is not None:  # ended while this process was forked: plain again
                self._end_ramps()
            return
        self._chains = (
            chain.from_iterable(iter(self._chunk_rr, None)),
            chain.from_iterable(iter(self._chunk_weighted, None)),
        )
        self._rr, self._wrr = self._chains
        self._reset_least_request()
        self._bind_default()

    def _bind_schedule(self) -> None:
        super()._bind_schedule()  # the plain schedule, when something else made it
        if self._ramps and self._chains is not None:
            self._wrr = self._chains[1]
            self._bind_default()

    def _end_ramps(self) -> None:
        """Every ramp is over: plain iterators from now on (the client reads ``default_it`` and
        ``iters`` on each pick, so the change takes effect at once)."""
        self._ramps = []
        self._chains = None
        self._wrr = _Calls(self._build_weighted)
        self._reset_least_request()
        ExpiringPicker.after_fork(self)

    def _reset_least_request(self) -> None:
        self._load = None  # the fast path stops here; the next pick rebuilds the candidates
        self._lr_count = 0

    # -- round_robin and weighted -------------------------------------------------------------

    def _chunk_rr(self) -> list[Node]:
        return self._chunk("rr")

    def _chunk_weighted(self) -> list[Node]:
        return self._chunk("w")

    def _base(self, kind: str) -> tuple[list[int], dict[int, int]]:
        """The plain schedule of ``kind`` (node indices) and each ramping node's count in it."""
        found = self._bases.get(kind)
        if found is None:
            n = len(self._nodes_list)
            base = list(range(n)) if kind == "rr" else smooth_wrr(self._weights())
            found = self._bases[kind] = (base, {i: base.count(i) for i, _ in self._ramps})
        return found

    def _weights(self) -> list[int]:
        return [n.weight for n in self._nodes_list]

    def _chunk(self, kind: str) -> list[Node]:
        """The next :data:`CHUNK` picks, from the schedule of the current ramp levels. Never
        raises: the chain it feeds would end for good (plain round-robin instead)."""
        try:
            now = _time_ns()
            if not self._ramps or all(now >= t + self._window() for _, t in self._ramps):
                if self._ramps:
                    self._end_ramps()
                return list(islice(self._rr if kind == "rr" else self._wrr, CHUNK))
            base, counts = self._base(kind)
            kept = ramp_counts(counts, self._ramps, self._ramp(), now)
            state = self._state.get(kind)
            if state is None or state.kept != kept:
                nodes = self._nodes_list
                schedule = [nodes[i] for i in ramp_schedule(base, kept)]
                state = self._state[kind] = _Schedule(kept, schedule)
            pos = state.pos
            state.pos = (pos + CHUNK) % state.period
            return state.extended[pos : pos + CHUNK]
        except Exception:  # a bug here must never stop picks
            return list(self._nodes_list)

    def _ramp(self) -> SlowStart:
        ramp = self.service.slow_start
        assert ramp is not None
        return ramp

    def _window(self) -> int:
        return self._ramp().window_ns

    # -- least_request ------------------------------------------------------------------------
    # Its pick is unchanged: the ramp rides on its first draw stream, which every CHUNK draws
    # calls _lr_chunk (clock, levels) like the round-robin chains above. What _lr_chunk
    # changes must leave the pick in progress consistent: it only sends the next pick to the
    # slow path (_reset_least_request), which rebuilds.

    # No per-pick clock read (and no Python frame of ExpiringPicker's): an ejection's end is
    # noticed by _lr_chunk, within CHUNK picks.
    least_request = ServicePicker.least_request

    def _least_request_slow(self) -> Node:
        if self.expires_ns and _time_ns() >= self.expires_ns:
            self._expire()
        return super()._least_request_slow()

    def _lr_streams(self) -> None:
        super()._lr_streams()
        if self._ramps or self.expires_ns:
            self._lr_i = chain.from_iterable(iter(partial(self._lr_chunk, self._lr_i), None))

    def _lr_chunk(self, draws: Iterator[int]) -> list[int]:
        try:
            now = _time_ns()
            if self.expires_ns and now >= self.expires_ns:
                # Not rebuilt here, in the middle of a pick that still reads the old streams:
                # the next pick takes the slow path, which rebuilds.
                self._reset_least_request()
            elif not self._ramps:
                pass
            elif all(now >= t + self._window() for _, t in self._ramps):
                self._end_ramps()  # the next pick rebuilds plain candidates
            else:
                base, counts = self._base("w")
                kept = ramp_counts(counts, self._ramps, self._ramp(), now, _lr_rounds(base))
                if kept != self._lr_levels:
                    self._reset_least_request()  # the next pick rebuilds the candidates
        except Exception:  # never end the chain
            pass
        return list(islice(draws, CHUNK))

    def _lr_candidates(self) -> list[Node]:
        if not self._ramps:
            return super()._lr_candidates()
        base, counts = self._base("w")
        rounds = _lr_rounds(base)
        kept = self._lr_levels = ramp_counts(counts, self._ramps, self._ramp(), _time_ns(), rounds)
        nodes = self._nodes_list
        return [nodes[i] for i in ramp_schedule(base, kept, rounds)]


def _lr_rounds(base: Sequence[int]) -> int:
    """Rounds of least_request's candidates: at most 256 of them when that leaves at least 5
    levels (its draws stay on the byte path of :mod:`~clustermap.balance.draws`), else
    :data:`STEPS` (a large service: 16-bit draws)."""
    rounds = 256 // len(base)
    return min(rounds, STEPS) if rounds >= 5 else STEPS


class _Schedule:
    """A ramp schedule at one set of levels, served :data:`CHUNK` picks at a time."""

    __slots__ = ("extended", "kept", "period", "pos")

    def __init__(self, kept: dict[int, int], schedule: list[Node]) -> None:
        self.kept = kept
        self.period = len(schedule)
        # Long enough to slice CHUNK picks from any position of a period.
        self.extended = schedule * (CHUNK // self.period + 2)
        self.pos = int(_random() * self.period)  # a random start per process, as round-robin
