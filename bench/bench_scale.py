"""Scale curves of the region: 100 -> 10 000 services x 100 nodes, and a worker's memory.

Run: uv run python bench/bench_scale.py [--sizes 100,300,1000,3000,10000] [--nodes 100]
     [--quick] [--json PATH]

For each map size, in a fresh region on /dev/shm: the region's size against its payload (the
encoded services), a full publish (``replace_all``), a 1-node delta publish (median of 31), a
worker's validated re-read + decode of one changed service (median), what the first ``pick``
after that change costs a worker in all (re-read plus a new picker), and what the first keyed
``pick`` of that version costs on top (building its Maglev table). Then, in a fresh
worker process on the largest map: resident memory after ``import clustermap``, after opening
the region, after picking in 10 services, and after keyed (Maglev) picks in those 10 services.
Bars (DESIGN §5, at 10 000 x 100): full publish <= 1 s, 1-node delta <= 5 ms, region <= 1.5 x
payload, re-reading a changed 100-node service <= 150 us.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import machine, make_service, once_s, write_json

import clustermap
from clustermap.model import Node, Service
from clustermap.region import layout as L
from clustermap.region.reader import RegionReader
from clustermap.region.writer import RegionWriter

MEMORY = r"""
import json, sys


def rss_kib():
    keep = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
    with open("/proc/self/status") as f:
        rows = [line.split(":") for line in f]
    return {k: int(v.split()[0]) for k, v in rows if k in keep}


out = {"interpreter": rss_kib()}
import clustermap
out["import"] = rss_kib()
cm = clustermap.open(sys.argv[1])
out["open"] = rss_kib()
names = [f"service-{i:05d}" for i in range(0, 10 * int(sys.argv[2]), int(sys.argv[2]))]
for _ in range(100):
    for name in names:
        cm.pick(name)
out["10 services"] = rss_kib()
for i in range(100):
    for name in names:
        cm.pick(name, key=f"user:{i}")
out["10 services, keyed"] = rss_kib()
print(json.dumps(out))
"""


def _changed(s: Service, rev: int) -> Service:
    nodes = (*s.nodes[:-1], Node(s.nodes[-1].host, 9999, rev % 7 + 1))
    return Service(s.name, nodes, revision=rev)


def one_size(path: str, services: int, nodes: int) -> dict[str, float]:
    data = [make_service(i, nodes) for i in range(services)]
    payload = sum(len(L.encode_service(s)) for s in data)
    with RegionWriter(path) as w:
        t0 = time.perf_counter()
        w.replace_all(data)
        full = time.perf_counter() - t0
        size = os.path.getsize(path)
        rev = [1]

        def delta() -> None:
            rev[0] += 1
            s = data[rev[0] % len(data)]
            w.publish([_changed(s, rev[0])])

        delta_s = once_s(delta, repeat=31)
        target = data[services // 2]
        reader = RegionReader(path)
        cm = clustermap.open(path)
        cm.pick(target.name)
        reread, first_pick, first_keyed = [], [], []
        for _ in range(5):  # warm-up, not timed
            rev[0] += 1
            w.publish([_changed(target, rev[0])])
            reader.lookup(target.name)
            cm.pick(target.name)
        for _ in range(31):
            rev[0] += 1
            w.publish([_changed(target, rev[0])])
            t0 = time.perf_counter()
            reader.lookup(target.name)
            t1 = time.perf_counter()
            cm.pick(target.name)
            t2 = time.perf_counter()
            reread.append(t1 - t0)
            first_pick.append(t2 - t1)
        for i in range(11):  # apart: a 65 537-slot table build disturbs the caches for a while
            rev[0] += 1
            w.publish([_changed(target, rev[0])])
            cm.pick(target.name)
            t0 = time.perf_counter()
            cm.pick(target.name, key=f"user:{i}")  # builds this version's Maglev table
            first_keyed.append(time.perf_counter() - t0)
    return {
        "services": services,
        "nodes": nodes,
        "payload_bytes": payload,
        "region_bytes": size,
        "region_over_payload": size / payload,
        "full_publish_s": full,
        "delta_publish_ms": delta_s * 1e3,
        "reread_us": statistics.median(reread) * 1e6,
        "reread_us_min": min(reread) * 1e6,
        "first_pick_after_change_us": statistics.median(first_pick) * 1e6,
        "first_keyed_pick_after_change_ms": statistics.median(first_keyed) * 1e3,
    }


def memory(path: str, services: int) -> dict[str, dict[str, int]]:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY, path, str(max(services // 10, 1))],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,300,1000,3000,10000")
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="sizes 100,300,1000,3000")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    sizes = [100, 300, 1000, 3000] if args.quick else [int(x) for x in args.sizes.split(",")]
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="cm-bench-")
    rows = []
    try:
        print(f"machine: {machine()}")
        print(
            f"{'services':>8} x nodes  {'payload MiB':>11} {'region MiB':>10} {'ratio':>6} "
            f"{'full s':>7} {'delta ms':>8} {'re-read us':>10} {'1st pick us':>11} "
            f"{'1st key ms':>10}"
        )
        for n in sizes:
            path = os.path.join(d, f"s{n}.region")
            r = one_size(path, n, args.nodes)
            rows.append(r)
            print(
                f"{n:8} x {args.nodes:<5} {r['payload_bytes'] / 2**20:11.2f} "
                f"{r['region_bytes'] / 2**20:10.2f} {r['region_over_payload']:6.2f} "
                f"{r['full_publish_s']:7.3f} {r['delta_publish_ms']:8.3f} "
                f"{r['reread_us']:10.1f} {r['first_pick_after_change_us']:11.1f} "
                f"{r['first_keyed_pick_after_change_ms']:10.1f}"
            )
            if n != sizes[-1]:
                os.unlink(path)
        mem = memory(os.path.join(d, f"s{sizes[-1]}.region"), sizes[-1])
        print(f"worker memory on the {sizes[-1]} x {args.nodes} map (KiB):")
        for stage, kib in mem.items():
            print(
                f"  {stage:20} RSS {kib['VmRSS']:7}  anon {kib['RssAnon']:7}  "
                f"file {kib['RssFile']:6}  shmem {kib['RssShmem']:6}"
            )
        write_json(
            args.json,
            {
                "rows": rows,
                "memory_kib": mem,
                "memory_map": f"{sizes[-1]}x{args.nodes}",
                "bars": {
                    "full_publish_s": 1.0,
                    "delta_publish_ms": 5.0,
                    "region_over_payload": 1.5,
                    "reread_us": 150.0,
                },
            },
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
