"""Each node's latency for least_request, from its calls in flight (pure: no I/O, no clock).

A worker's ``call()`` reads no clock (two clock reads and a third store were a fifth of its cost,
docs/performance.md §1b): it counts a call in flight when it starts and as done when it ends. The
sidecar sees each node's calls in flight, summed over the machine's workers, at every sweep. By
Little's law the mean latency of the calls a node finished in a window is its busy time (the
integral of its calls in flight) over those completions; the busy time is the sum over sweeps of
the calls in flight × the time since the previous sweep. Callers of ``report(..., latency=x)``,
whose calls were never in flight, add their latencies to the busy time.

Such a sample is noisy when calls are short next to the sweep interval (a 1 ms call is seen by one
sweep in 20, and then counts as 20 ms) or long next to the window (a window that closes during a
call holds part of its time without its completion). Peak EWMA takes a high sample at once, so a
noisy one would make a fast node look slow and lose it its traffic. A window therefore feeds the
average only once it holds all of: ``min_sightings`` calls seen in flight (summed over sweeps; a
reported latency counts as the sightings it would have made), ``min_done`` completions, and twice
as many completions as calls still in flight. Simulated (``bench/bench_latency.py``: Poisson
arrivals, 20 ms sweeps, latencies of 2-300 ms, fixed or exponential) the figure stays within
0.7-1.5 × the true mean and below 2.4 × at worst, where the per-sweep means of timed calls that
this replaces rode at 2-4 × for exponential latencies. A node with little traffic gets few
samples, and its figure decays toward 0 meanwhile.

The average is Finagle's peak EWMA: a sample above it is taken at once, one below is blended in
with decay time ``tau``; a figure with no samples decays toward 0, so a node avoided for being
slow is tried again in time. A sweep more than ``max_gap`` after the previous one (a stalled
sidecar) adds neither time nor completions: its calls in flight say nothing of the gap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = ["Latencies"]

#: A mean latency above an hour is garbage, not a sample (µs).
MAX_LATENCY_US: Final = 3600e6
#: Figures without a sample decay at most this often (seconds).
_DECAY_PERIOD: Final = 0.25


@dataclass(slots=True)
class _Window:
    busy: float = 0.0  # seconds: calls in flight x time, plus reported latencies
    sightings: float = 0.0
    done: int = 0


class Latencies:
    """Node id -> latency (µs), updated once per sweep by :meth:`step`."""

    def __init__(
        self,
        *,
        min_sightings: int = 24,
        min_done: int = 6,
        max_gap: float = 0.25,
        tau: float = 10.0,
    ) -> None:
        self.min_sightings = min_sightings
        self.min_done = min_done
        self.max_gap = max_gap
        self.tau = tau
        self._windows: dict[int, _Window] = {}
        self._figures: dict[int, tuple[float, float]] = {}  # id -> (µs, when it was set)
        self._last: float | None = None
        self._decay_at = -math.inf

    def figure(self, node_id: int) -> float:
        """The current figure of ``node_id`` in µs (0: none)."""
        return self._figures.get(node_id, (0.0, 0.0))[0]

    def step(
        self, now: float, in_flight: Mapping[int, int], done: Mapping[int, tuple[int, float]]
    ) -> dict[int, float]:
        """One sweep at ``now`` (seconds, monotonic): ``in_flight`` maps node ids to their calls
        in flight now, ``done`` to (calls finished since the previous sweep, seconds reported
        with those). Returns the new figure (µs, 0 = none) of every node whose figure changed."""
        last, self._last = self._last, now
        changed: dict[int, float] = {}
        dt = now - last if last is not None else 0.0
        if 0.0 < dt <= self.max_gap:
            windows = self._windows
            touched: dict[int, _Window] = {}
            for i, n in in_flight.items():
                if n > 0:
                    w = touched[i] = windows.get(i) or windows.setdefault(i, _Window())
                    w.busy += n * dt
                    w.sightings += n
            for i, (calls, seconds) in done.items():
                if calls > 0 or seconds > 0:
                    w = touched[i] = windows.get(i) or windows.setdefault(i, _Window())
                    w.busy += seconds
                    w.sightings += seconds / dt
                    w.done += calls
            for i, w in touched.items():
                if (
                    w.done >= self.min_done
                    and w.sightings >= self.min_sightings
                    and w.done >= 2 * in_flight.get(i, 0)
                ):
                    del windows[i]
                    changed[i] = self._sample(i, min(w.busy * 1e6 / w.done, MAX_LATENCY_US), now)
        if now - self._decay_at >= _DECAY_PERIOD:
            self._decay_at = now
            changed.update(self._decay(now, changed))
        return changed

    def _sample(self, i: int, sample: float, now: float) -> float:
        old, when = self._figures.get(i, (0.0, now))
        if sample >= old:
            value = sample
        else:
            w = math.exp(-(now - when) / self.tau)
            value = old * w + sample * (1 - w)
        self._figures[i] = (value, now)
        return value

    def _decay(self, now: float, fresh: Mapping[int, float]) -> dict[int, float]:
        out: dict[int, float] = {}
        for i, (value, when) in list(self._figures.items()):
            if i in fresh:
                continue
            value *= math.exp(-(now - when) / self.tau)
            if value < 1:
                del self._figures[i]
                value = 0.0
            else:
                self._figures[i] = (value, now)
            out[i] = value
        return out

    def drop(self, node_ids: Iterable[int]) -> None:
        """Drop the windows and figures of these node ids (gone from the map)."""
        for i in node_ids:
            self._windows.pop(i, None)
            self._figures.pop(i, None)
