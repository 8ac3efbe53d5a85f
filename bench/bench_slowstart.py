"""Slow start's costs in a worker besides the warm pick (which bench_callgrind.py measures):
one schedule rebuild when a ramping node's weight reaches its next level, and the picker's
first build, at 10 / 100 / 1 000 nodes with one node ramping.

Run: uv run python bench/bench_slowstart.py [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from timeit import repeat

from common import write_json

from clustermap.balance.picker import ServicePicker, make_picker
from clustermap.balance.schedule import smooth_wrr
from clustermap.balance.slowstart import STEPS, ramp_counts, ramp_schedule
from clustermap.model import Node, Service, SlowStart

S = 1_000_000_000


def service(count: int, weighted: bool) -> Service:
    nodes = tuple(
        Node(f"10.0.{i // 250}.{i % 250}", 8080, weight=1 + i % 3 if weighted else 1)
        for i in range(count)
    )
    ramp = SlowStart(3600 * S, 1.0, 0.1, ((count - 1, time.time_ns() - 1800 * S),))
    return Service("s", nodes, slow_start=ramp)


def median_ms(stmt: object, number: int = 1, runs: int = 7) -> float:
    return statistics.median(repeat(stmt, number=number, repeat=runs)) / number * 1e3  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    rows = []
    print(
        f"{'nodes':>6} {'weights':>8} {'rebuild ms':>11} {'ramping picker ms':>18} {'plain ms':>9}"
    )
    for count in (10, 100, 1000):
        for weighted in (False, True):
            svc = service(count, weighted)
            assert svc.slow_start is not None
            base = smooth_wrr([n.weight for n in svc.nodes])
            since = svc.slow_start.since[0][1]
            ramps = [(count - 1, since)]
            counts = {count - 1: base.count(count - 1)}
            # The levels a ramp goes through; one rebuild is one ramp_schedule over them.
            kept = [
                ramp_counts(counts, ramps, svc.slow_start, since + k * 3600 * S // STEPS)
                for k in range(1, STEPS)
            ]
            rebuild = statistics.median(
                median_ms(lambda k=k, b=base: ramp_schedule(b, k), runs=3) for k in kept[::4]
            )
            ramping = median_ms(lambda svc=svc: make_picker(svc).pick(), runs=5)
            plain = median_ms(lambda svc=svc: ServicePicker(svc).pick(), runs=5)
            kind = "1-3" if weighted else "equal"
            print(f"{count:6} {kind:>8} {rebuild:11.2f} {ramping:18.2f} {plain:9.2f}")
            rows.append(
                {
                    "nodes": count,
                    "weights": kind,
                    "rebuild_ms": rebuild,
                    "ramping_picker_first_pick_ms": ramping,
                    "plain_picker_first_pick_ms": plain,
                }
            )
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
