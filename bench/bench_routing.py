"""The first pick of a new version inside a subset, key-less and keyed (docs/routing.md).

Run: uv run python bench/bench_routing.py [--quick] [--repeat 7] [--json PATH]

For N nodes in a subset (a service of 2 N nodes, ``version`` v0 / v1 alternating), each round
publishes a new version of the service and times, in a fresh handle, the first key-less pick in
the subset (re-read, decode, route, picker) and the first keyed pick in the other subset (its
Maglev table is built in the worker: the sidecar publishes tables for whole services only).
Medians of ``--repeat`` rounds, in ms. Warm subset picks are in bench_pick.py and
bench_callgrind.py.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, write_json

import clustermap
from clustermap.model import Node, Service
from clustermap.region.writer import RegionWriter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10 and 100 nodes only")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    sizes = (10, 100) if args.quick else (10, 100, 1000)
    tmp = Path(tempfile.mkdtemp(prefix="cm-bench-", dir="/dev/shm"))
    rows = []
    print(f"machine: {machine()}")
    print(f"{'nodes in the subset':>20} {'first key-less ms':>18} {'first keyed ms':>15}")
    try:
        region = tmp / "r.region"
        for n in sizes:
            keyless, keyed = [], []
            for rep in range(args.repeat):
                nodes = tuple(
                    Node(f"10.{i // 250}.{i % 250}.{rep}", 80, meta={"version": f"v{i % 2}"})
                    for i in range(2 * n)
                )
                with RegionWriter(region) as w:
                    w.publish([Service("s", nodes)], sync_ns=time.time_ns())
                cm = clustermap.open(region)
                t0 = time.perf_counter()
                cm.pick("s", subset={"version": "v1"})
                keyless.append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()
                cm.pick("s", "user:42", subset={"version": "v0"})
                keyed.append((time.perf_counter() - t0) * 1e3)
            a, b = statistics.median(keyless), statistics.median(keyed)
            print(f"{n:>20} {a:18.2f} {b:15.1f}")
            rows.append({"nodes": n, "first_keyless_ms": a, "first_keyed_ms": b})
        write_json(args.json, {"rows": rows})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
