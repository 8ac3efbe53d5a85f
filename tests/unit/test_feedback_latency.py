"""The sidecar's latency per node from calls in flight (Little's law), against simulated traffic.

A worker's call() reads no clock; the sidecar sees each node's calls in flight at every sweep
and the calls finished since the last one. These tests drive :class:`Latencies` with the exact
counts a sidecar would see of simulated calls (Poisson arrivals, sweeps every ~20 ms with
jitter, seeded) and check what it publishes: the mean where traffic allows, and never a fast
node made slow by sampling noise.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import pytest

from clustermap.sidecar.latency import Latencies

SWEEP = 0.02


@dataclass
class Traffic:
    """Calls to node 0 as (start, end), seen by sweeps every ~20 ms for ``seconds``."""

    rate: float
    latency: float
    seconds: float
    exponential: bool = False
    seed: int = 1

    def run(self, lat: Latencies) -> list[float]:
        """Every figure (µs) ``lat`` publishes for node 0, in order."""
        rnd = random.Random(self.seed)
        t, calls = 0.0, []
        while t < self.seconds:
            t += rnd.expovariate(self.rate)
            d = rnd.expovariate(1 / self.latency) if self.exponential else self.latency
            calls.append((t, t + d))
        starts = sorted(c[0] for c in calls)
        ends = sorted(c[1] for c in calls)
        figures = []
        prev, now = 0.0, 0.0
        lat.step(now, {}, {})
        while now < self.seconds:
            now += SWEEP * rnd.uniform(0.8, 1.5)
            n = bisect.bisect_right(starts, now) - bisect.bisect_right(ends, now)
            done = bisect.bisect_right(ends, now) - bisect.bisect_right(ends, prev)
            changed = lat.step(now, {0: n}, {0: (done, 0.0)} if done else {})
            if 0 in changed:
                figures.append(changed[0])
            prev = now
        return figures


@pytest.mark.parametrize(
    ("rate", "latency"),
    [(200.0, 0.005), (100.0, 0.03), (20.0, 0.3), (2.0, 0.3)],
    ids=["5ms", "30ms", "300ms-busy", "300ms-rare"],
)
def test_the_figure_follows_the_mean_latency(rate: float, latency: float) -> None:
    figures = Traffic(rate, latency, 120.0).run(Latencies())
    assert len(figures) > 20
    settled = sorted(f / latency / 1e6 for f in figures[len(figures) // 2 :])
    # Peak EWMA rides the higher samples, and between samples decays toward 0.
    assert 0.6 <= settled[len(settled) // 2] <= 1.3, settled[len(settled) // 2]
    assert settled[-1] <= 2.2, settled[-1]


@pytest.mark.parametrize("exponential", [False, True], ids=["fixed", "exponential"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_fast_node_at_a_low_rate_is_not_made_slow_by_sampling_noise(
    exponential: bool, seed: int
) -> None:
    """A 2 ms call is seen in flight by one sweep in ten and then counts as 20 ms: windows too
    small to average that out are not fed to the peak EWMA, which would take a high one at
    once and make the node look slow."""
    latency = 0.002
    figures = Traffic(30.0, latency, 120.0, exponential, seed).run(Latencies())
    assert figures  # measured, in time
    assert max(figures) <= 2.5 * latency * 1e6, max(figures) / latency / 1e6


def test_one_sighting_and_one_completion_make_no_sample() -> None:
    lat = Latencies()
    lat.step(0.0, {}, {})
    lat.step(0.02, {0: 1}, {})
    assert lat.step(0.04, {0: 0}, {0: (1, 0.0)}) == {}  # 20 ms from one sighting: too little
    assert lat.figure(0) == 0.0


def test_long_calls_wait_for_completions_not_just_sightings() -> None:
    """Four 1 s calls seen 50 times each: no sample until enough of them have finished."""
    lat = Latencies(min_done=4)
    lat.step(0.0, {}, {})
    now = 0.0
    for _ in range(50):
        now += 0.02
        assert lat.step(now, {0: 4}, {}) == {}
    now += 0.02
    assert lat.step(now, {0: 1}, {0: (3, 0.0)}) == {}  # 3 done, 1 still in flight
    now += 0.02
    changed = lat.step(now, {0: 0}, {0: (1, 0.0)})
    assert changed[0] == pytest.approx((50 * 4 + 1) * 0.02 / 4 * 1e6)


def test_a_stalled_sweep_adds_neither_time_nor_completions() -> None:
    lat = Latencies(min_sightings=1, min_done=1)
    lat.step(0.0, {}, {})
    lat.step(0.02, {0: 2}, {})
    # The sidecar stalls for 5 s: two calls in flight at its end say nothing of the gap.
    assert lat.step(5.02, {0: 2}, {0: (100, 0.0)}) == {}
    changed = lat.step(5.04, {0: 0}, {0: (2, 0.0)})
    assert changed[0] == pytest.approx(2 * 0.02 / 2 * 1e6)


def test_reported_latencies_count_as_busy_time() -> None:
    """report(latency=x) callers were never in flight: their seconds are the busy time."""
    lat = Latencies()
    lat.step(0.0, {}, {})
    assert lat.step(0.02, {}, {0: (5, 5 * 0.05)}) == {}  # 5 done: not yet enough
    changed = lat.step(0.04, {}, {0: (5, 5 * 0.05)})
    assert changed[0] == pytest.approx(50_000)


def test_peak_ewma_takes_a_slower_sample_at_once_and_decays_without_samples() -> None:
    lat = Latencies(min_sightings=0, min_done=1, tau=10.0)
    lat.step(0.0, {}, {})
    assert lat.step(0.02, {}, {0: (1, 0.01)})[0] == pytest.approx(10_000)
    assert lat.step(0.04, {}, {0: (1, 0.1)})[0] == pytest.approx(100_000)  # at once
    faster = lat.step(0.06, {}, {0: (1, 0.01)})[0]
    assert 99_000 < faster < 100_000  # blended in slowly
    now = 0.06
    while lat.figure(0) > 0:  # no samples: the figure decays to nothing, the node is retried
        now += 1.0
        lat.step(now, {}, {})
        assert now < 200
    assert lat.step(now + 1.0, {}, {}) == {}


def test_drop_forgets_a_removed_nodes_window_and_figure() -> None:
    lat = Latencies(min_sightings=1, min_done=1)
    lat.step(0.0, {}, {})
    lat.step(0.02, {0: 1, 1: 1}, {})
    lat.step(0.04, {}, {0: (1, 0.0), 1: (1, 0.0)})
    lat.drop([0])
    assert lat.figure(0) == 0.0
    assert lat.figure(1) > 0
