"""Slow start: a node that joined or came back up ramps its weight over a window, as Envoy does.

The ramp (pure, :func:`ramp_factor`) is Envoy's: ``max(min_weight, time_factor ** (1 /
aggression))`` with ``time_factor = max(elapsed, 1 s) / window``. The clock is the region's:
the sidecar publishes when each ramp started (:class:`clustermap.model.SlowStart`), so every
worker on the machine ramps together.

A worker never rebuilds a picker per pick. :class:`RampingPicker` serves round_robin and
weighted picks from a chain of C iterators, like a plain picker; every :data:`CHUNK` picks the
chain calls :meth:`RampingPicker._chunk`, which reads the clock and, only when a node's weight
moved to another of the ramp's :data:`STEPS` levels, rebuilds the smooth WRR schedule. So a warm
pick stays O(1) (a C ``next()`` plus one Python call per 64 picks), and a ramp rebuilds each
schedule at most ``STEPS`` times. least_request reads the clock on each pick (it runs Python
code anyway) and rebuilds its candidates on the same levels. When the last ramp ends, the picker
rebinds its plain iterators in place: afterwards it costs what a plain picker costs.
random, weighted_random and consistent_hash do not ramp (Envoy ramps round robin and least
request only; a hash ring that moved keys as weights ramp would defeat affinity).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import chain, cycle, islice
from typing import Final

from clustermap.balance.picker import ExpiringPicker, MaglevTable, _Calls, _random, _time_ns
from clustermap.balance.schedule import smooth_wrr
from clustermap.feedback.layout import MAX_EJECTION_S
from clustermap.model import Node, Service, SlowStart

__all__ = ["CHUNK", "STEPS", "RampingPicker", "ramp_factor", "ramp_weights", "ramping"]

#: Weight levels of a ramp: a ramping node's weight is ``floor(weight * factor * STEPS)``
#: against ``weight * STEPS`` for the others (never below 1), so a schedule is rebuilt at most
#: this many times per ramp.
STEPS: Final = 20
#: Picks served between two reads of the clock during a ramp (round_robin, weighted).
CHUNK: Final = 64
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


def ramp_weights(
    weights: Sequence[int], ramps: Sequence[tuple[int, int]], ramp: SlowStart, now_ns: int
) -> list[int]:
    """Integer schedule weights at ``now_ns``: ``weights[i] * STEPS``, and for each ``(i,
    since_ns)`` of ``ramps`` ``max(1, floor(weights[i] * factor * STEPS))``."""
    out = [w * STEPS for w in weights]
    window_s = ramp.window_ns / 1e9
    for i, since in ramps:
        f = ramp_factor((now_ns - since) / 1e9, window_s, ramp.aggression, ramp.min_weight)
        out[i] = max(1, int(weights[i] * f * STEPS))
    return out


class RampingPicker(ExpiringPicker):
    """The picker of a service with nodes in slow start (and possibly ejected nodes)."""

    __slots__ = ("_chains", "_lr_check", "_lr_levels", "_ramps", "_state")

    def __init__(
        self,
        service: Service,
        maglev_source: Callable[[], MaglevTable | None] | None = None,
    ) -> None:
        self._ramps: list[tuple[int, int]] = []
        self._chains: tuple[Iterator[Node], Iterator[Node]] | None = None
        # per strategy ("rr", "w"): [levels, cycle over its schedule]
        self._state: dict[str, list[object]] = {}
        self._lr_levels: tuple[int, ...] | None = None
        self._lr_check = 0
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
        self._lr_levels = None
        self._lr_check = 0
        if not self._ramps:
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

    def _chunk_rr(self) -> Iterator[Node]:
        return self._chunk("rr", [1] * len(self._nodes_list))

    def _chunk_weighted(self) -> Iterator[Node]:
        return self._chunk("w", [n.weight for n in self._nodes_list])

    def _chunk(self, kind: str, weights: list[int]) -> Iterator[Node]:
        """The next :data:`CHUNK` picks, from the schedule of the current ramp levels."""
        now = _time_ns()
        if not self._ramps or all(now >= since + self._window() for _, since in self._ramps):
            if self._ramps:
                self._end_ramps()
            return islice(self._rr if kind == "rr" else self._wrr, CHUNK)
        levels = tuple(ramp_weights(weights, self._ramps, self._ramp(), now))
        state = self._state.get(kind)
        if state is None or state[0] != levels:
            nodes = self._nodes_list
            schedule = [nodes[i] for i in smooth_wrr(levels)]
            start = int(_random() * len(schedule))
            state = self._state[kind] = [levels, cycle(schedule[start:] + schedule[:start])]
        it = state[1]
        assert isinstance(it, Iterator)
        return islice(it, CHUNK)

    def _ramp(self) -> SlowStart:
        ramp = self.service.slow_start
        assert ramp is not None
        return ramp

    def _window(self) -> int:
        return self._ramp().window_ns

    # -- least_request ------------------------------------------------------------------------

    def least_request(self) -> Node:
        if self._ramps:
            now = _time_ns()
            if now >= self._lr_check:
                self._lr_tick(now)
        return super().least_request()

    def _lr_tick(self, now: int) -> None:
        # Clock reads are cheap next to least_request; level changes are checked every 10 ms.
        self._lr_check = now + 10_000_000
        if all(now >= since + self._window() for _, since in self._ramps):
            self._end_ramps()
            return
        levels = tuple(
            ramp_weights([n.weight for n in self._nodes_list], self._ramps, self._ramp(), now)
        )
        if levels != self._lr_levels:
            self._lr_levels = levels
            self._reset_least_request()

    def _lr_candidates(self) -> list[Node]:
        levels = self._lr_levels
        if not self._ramps or levels is None:
            return super()._lr_candidates()
        nodes = self._nodes_list
        return [nodes[i] for i in smooth_wrr(levels)]
