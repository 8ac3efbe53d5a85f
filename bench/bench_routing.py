"""The first pick of a new version inside a subset, key-less and keyed (docs/routing.md).

Run: uv run python bench/bench_routing.py [--quick] [--repeat 7] [--json PATH]

For N nodes in a subset (a hashed service, meta ``hash=maglev``, of 2 N nodes, ``version``
v0 / v1 alternating), each round publishes a new version of the service and times, in a fresh
handle, the first key-less pick in the subset (re-read, decode, route, picker) and the first
keyed pick in the other subset: with the subsets declared (meta ``subset_keys=version``: the
writer publishes their tables, the worker indexes one) and without (the worker builds the
table itself, as every undeclared subset does). Also the region bytes the declared subsets'
tables add. Medians of ``--repeat`` rounds, in ms. Warm subset picks are in bench_pick.py and
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
    print(
        f"{'nodes in the subset':>20} {'first key-less ms':>18} {'first keyed ms':>15}"
        f" {'keyed, undeclared ms':>21} {'subset tables KiB':>18}"
    )
    try:
        region = tmp / "r.region"
        for n in sizes:
            keyless, keyed, undeclared = [], [], []
            extra = 0
            for rep in range(args.repeat):
                nodes = tuple(
                    Node(f"10.{i // 250}.{i % 250}.{rep}", 80, meta={"version": f"v{i % 2}"})
                    for i in range(2 * n)
                )
                for declared in (True, False):
                    meta = {"hash": "maglev"}
                    if declared:
                        meta["subset_keys"] = "version"
                    with RegionWriter(region) as w:
                        w.publish([Service("s", nodes, meta=meta)], sync_ns=time.time_ns())
                        if declared:
                            extra = sum(e.extra for e in w._slots.values())
                    cm = clustermap.open(region)
                    if declared:
                        t0 = time.perf_counter()
                        cm.pick("s", subset={"version": "v1"})
                        keyless.append((time.perf_counter() - t0) * 1e3)
                    t0 = time.perf_counter()
                    cm.pick("s", "user:42", subset={"version": "v0"})
                    (keyed if declared else undeclared).append((time.perf_counter() - t0) * 1e3)
                    assert cm.picker("s", {"version": "v0"}).maglev_shared == declared
            a, b, c = map(statistics.median, (keyless, keyed, undeclared))
            print(f"{n:>20} {a:18.2f} {b:15.2f} {c:21.1f} {extra / 1024:18.0f}")
            rows.append(
                {
                    "nodes": n,
                    "first_keyless_ms": a,
                    "first_keyed_ms": b,
                    "first_keyed_undeclared_ms": c,
                    "subset_table_bytes": extra,
                }
            )
        write_json(args.json, {"rows": rows})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
