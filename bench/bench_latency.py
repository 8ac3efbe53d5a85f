"""How well the sidecar's latency per node follows the true mean: calls in flight vs a clock.

Run: uv run python bench/bench_latency.py [--seconds 120] [--json PATH]

A worker's ``call()`` reads no clock; the sidecar derives each node's latency from the calls in
flight it sees at every sweep (Little's law, ``clustermap/sidecar/latency.py``). This simulates
one node's calls (Poisson arrivals; latencies fixed or exponential with the given mean; sweeps
every 20 ms with the jitter of a loaded machine, seeds 1-3) and feeds the exact counts a sidecar
would see to :class:`~clustermap.sidecar.latency.Latencies`. Beside it, what the sidecar did
while workers timed their calls: each sweep's mean of the latencies that finished, fed to the
same peak EWMA. Figures are the published latency over the true mean, over the second half of
the run: the median, and the largest ever published. Pure computation, deterministic, a few
seconds.
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
import statistics

from common import write_json

from clustermap.sidecar.latency import Latencies

SWEEP = 0.02
TAU = 10.0  # the peak EWMA's decay time, as in clustermap.sidecar.latency
CASES = [(30, 0.002), (200, 0.005), (5, 0.03), (100, 0.03), (2, 0.3), (20, 0.3)]


def run(
    rate: float, mean: float, seconds: float, exponential: bool, seed: int
) -> tuple[list[float], list[float]]:
    """(figures published from calls in flight, figures from timed calls), in µs."""
    rnd = random.Random(seed)
    t, calls = 0.0, []
    while t < seconds:
        t += rnd.expovariate(rate)
        calls.append((t, t + (rnd.expovariate(1 / mean) if exponential else mean)))
    starts = sorted(c[0] for c in calls)
    by_end = sorted(calls, key=lambda c: c[1])
    ends = [c[1] for c in by_end]
    lat = Latencies()
    lat.step(0.0, {}, {})
    little: list[float] = []
    timed: list[float] = []
    figure, when, decay_at = 0.0, 0.0, 0.0
    prev = now = 0.0
    while now < seconds:
        now += SWEEP * rnd.uniform(0.8, 1.5)
        in_flight = bisect.bisect_right(starts, now) - bisect.bisect_right(ends, now)
        a, b = bisect.bisect_right(ends, prev), bisect.bisect_right(ends, now)
        changed = lat.step(now, {0: in_flight}, {0: (b - a, 0.0)} if b > a else {})
        if 0 in changed:
            little.append(changed[0])
        if b > a:  # the clock: this sweep's mean of the latencies that finished, peak EWMA
            sample = sum(e - s for s, e in by_end[a:b]) / (b - a) * 1e6
            if sample >= figure:
                figure = sample
            else:
                w = math.exp(-(now - when) / TAU)
                figure = figure * w + sample * (1 - w)
            when = now
            timed.append(figure)
        elif now - decay_at >= 0.25:
            decay_at = now
            figure *= math.exp(-(now - when) / TAU)
            when = now
            timed.append(figure)
        prev = now
    return little, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    print("published latency / true mean, second half of the run, seeds 1-3")
    print(
        f"{'calls/s':>7} {'mean':>6} {'latencies':>11} | {'in flight: median':>17} {'max':>5}"
        f" | {'timed: median':>13} {'max':>5}"
    )
    rows = []
    for rate, mean in CASES:
        for exponential in (False, True):
            per_seed = []
            for seed in (1, 2, 3):
                little, timed = run(rate, mean, args.seconds, exponential, seed)
                scale = mean * 1e6
                per_seed.append(
                    (
                        statistics.median(x / scale for x in little[len(little) // 2 :]),
                        max(little) / scale,
                        statistics.median(x / scale for x in timed[len(timed) // 2 :]),
                        max(timed) / scale,
                    )
                )
            row = {
                "rate": rate,
                "mean_s": mean,
                "latencies": "exponential" if exponential else "fixed",
                "in_flight_median": statistics.mean(r[0] for r in per_seed),
                "in_flight_max": max(r[1] for r in per_seed),
                "timed_median": statistics.mean(r[2] for r in per_seed),
                "timed_max": max(r[3] for r in per_seed),
            }
            rows.append(row)
            print(
                f"{rate:7} {mean * 1000:4.0f}ms {row['latencies']:>11} | "
                f"{row['in_flight_median']:17.2f} {row['in_flight_max']:5.2f} | "
                f"{row['timed_median']:13.2f} {row['timed_max']:5.2f}"
            )
    write_json(args.json, {"seconds": args.seconds, "rows": rows})


if __name__ == "__main__":
    main()
