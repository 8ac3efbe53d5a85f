"""Maglev tables published by the writer: what a worker's first keyed pick costs after a change,
what keyed picks cost a worker in memory, and what the tables cost the region and the writer.

Run: uv run python bench/bench_tables.py [--nodes 10,100,1000] [--services 10000]
     [--hashed 0,100,1000] [--quick] [--json PATH]

1. First keyed ``pick()`` of a new version, in a worker (this process), at 10 / 100 / 1000
   nodes: the writer publishes a 1-node change, then the worker's first ``pick(name, key)``
   is timed (re-read, new picker, table). Median of 15, with the table published (now) and
   without (the fallback, and what every worker paid before: building the table itself).
   Also the writer's publish of that change (the table is built there, once per machine).
2. Memory of a fresh worker process after keyed picks in 10 hashed 100-node services, with and
   without published tables: private (anonymous) memory and region pages (shared).
3. Region size at ``--services`` x 100 nodes with 0, 100, 1000 of them hashed, against the
   services' payload (DESIGN §5 bar: region <= 1.5 x payload) and against payload + tables.
Bars (DESIGN §5b): first keyed pick of a new version of a 100-node service <= 1 ms in every
worker; <= 50 KiB of extra private memory per worker per hashed service.
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
from collections.abc import Iterator
from contextlib import contextmanager

from common import machine, make_service, write_json

import clustermap
from clustermap.model import Node, Service
from clustermap.region import layout as L
from clustermap.region import writer as writer_module
from clustermap.region.tables import TablePlan
from clustermap.region.writer import RegionWriter

MEMORY = r"""
import json, sys


def kib():
    keep = ("VmRSS", "RssAnon", "RssShmem")
    with open("/proc/self/status") as f:
        rows = [line.split(":") for line in f]
    return {k: int(v.split()[0]) for k, v in rows if k in keep}


import clustermap
cm = clustermap.open(sys.argv[1])
names = [f"service-{i:05d}" for i in range(10)]
for _ in range(100):
    for name in names:
        cm.pick(name)
out = {"picks": kib()}
for i in range(100):
    for name in names:
        cm.pick(name, key=f"user:{i}")
out["keyed picks"] = kib()
out["shared"] = sum(cm.picker(n).maglev_shared for n in names)
if sys.argv[2] == "subsets":  # keyed picks in both declared subsets of each service too
    for i in range(100):
        for name in names:
            for v in ("v0", "v1"):
                cm.pick(name, f"user:{i}", subset={"version": v})
    out["keyed subset picks"] = kib()
    out["subsets_shared"] = sum(
        cm.picker(n, {"version": v}).maglev_shared for n in names for v in ("v0", "v1")
    )
print(json.dumps(out))
"""


@contextmanager
def tables_disabled() -> Iterator[None]:
    """A writer that publishes no tables: an older sidecar, or a service it has none for."""
    real = writer_module.table_plan
    writer_module.table_plan = lambda service, budget=0: TablePlan([], "")
    try:
        yield
    finally:
        writer_module.table_plan = real


@contextmanager
def unlimited_budget() -> Iterator[None]:
    real = writer_module.TABLE_BUDGET_S
    writer_module.TABLE_BUDGET_S = 1e9
    try:
        yield
    finally:
        writer_module.TABLE_BUDGET_S = real


def hashed(i: int, nodes: int, revision: int = 1) -> Service:
    s = make_service(i, nodes, revision)
    return Service(s.name, s.nodes, strategy="consistent_hash", revision=revision)


def changed(s: Service, rev: int) -> Service:
    nodes = (*s.nodes[:-1], Node(s.nodes[-1].host, 9000 + rev % 1000, rev % 7 + 1))
    return Service(s.name, nodes, strategy=s.strategy, revision=rev)


def first_keyed(path: str, nodes: int, repeat: int) -> dict[str, float]:
    """Median ms of a worker's first keyed pick after a change, and of the writer's publish."""
    target = hashed(1, nodes)
    picks, publishes, shared = [], [], 0
    with RegionWriter(path) as w:
        w.publish([target, *(hashed(i, 10) for i in range(2, 20))])
        cm = clustermap.open(path)
        cm.pick(target.name, "warm")
        for rev in range(2, repeat + 4):
            t0 = time.perf_counter()
            w.publish([changed(target, rev)])
            t1 = time.perf_counter()
            cm.pick(target.name, f"user:{rev}")
            t2 = time.perf_counter()
            if rev >= 4:  # two warm-up rounds
                publishes.append(t1 - t0)
                picks.append(t2 - t1)
                shared += cm.picker(target.name).maglev_shared
    os.unlink(path)
    return {
        "first_keyed_pick_ms": statistics.median(picks) * 1e3,
        "first_keyed_pick_max_ms": max(picks) * 1e3,
        "writer_publish_ms": statistics.median(publishes) * 1e3,
        "shared": shared / len(picks),
    }


def with_subsets(s: Service) -> Service:
    """``s`` with nodes of versions v0 / v1 and the subset declared (meta subset_keys)."""
    nodes = tuple(n._replace(meta={"version": f"v{k % 2}"}) for k, n in enumerate(s.nodes))
    meta = {"subset_keys": "version"}
    return Service(s.name, nodes, strategy=s.strategy, revision=s.revision, meta=meta)


def memory(path: str, subsets: bool = False) -> dict[str, object]:
    data = [hashed(i, 100) for i in range(10)]
    with RegionWriter(path) as w, unlimited_budget():
        w.publish([with_subsets(s) for s in data] if subsets else data)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY, path, "subsets" if subsets else "whole"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    os.unlink(path)
    result: dict[str, object] = json.loads(out)
    return result


def region_size(path: str, services: int, hashed_count: int) -> dict[str, float]:
    data = [hashed(i, 100) if i < hashed_count else make_service(i, 100) for i in range(services)]
    payload = sum(len(L.encode_service(s)) for s in data)
    with RegionWriter(path) as w, unlimited_budget():
        t0 = time.perf_counter()
        w.replace_all(data)
        publish_s = time.perf_counter() - t0
    size = os.path.getsize(path)
    tables = hashed_count * (L.RECORD_HEADER.size + 24 + 65537)  # <= 256 nodes: 1 byte each
    os.unlink(path)
    return {
        "services": services,
        "hashed": hashed_count,
        "payload_bytes": payload,
        "tables_bytes": tables,
        "region_bytes": size,
        "region_over_payload": size / payload,
        "region_over_payload_and_tables": size / (payload + tables),
        "full_publish_s": publish_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default="10,100,1000")
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--hashed", default="0,100,1000")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="3000 services, 0/100 hashed")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if args.quick:
        args.services, args.hashed = 3000, "0,100"
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="cm-bench-")
    path = os.path.join(d, "t.region")
    try:
        print(f"machine: {machine()}")
        print("1. first keyed pick of a new version, in a worker (median ms)")
        print(f"{'nodes':>6} {'table published':>16} {'worker builds':>14} {'writer publish':>15}")
        picks = []
        for n in map(int, args.nodes.split(",")):
            with unlimited_budget():
                now = first_keyed(path, n, args.repeat)
            with tables_disabled():
                before = first_keyed(path, n, max(5, args.repeat // 3))
            picks.append({"nodes": n, "published": now, "worker_builds": before})
            print(
                f"{n:6} {now['first_keyed_pick_ms']:13.3f} ms {before['first_keyed_pick_ms']:11.1f}"
                f" ms {now['writer_publish_ms']:12.1f} ms"
                f"   (max {now['first_keyed_pick_max_ms']:.3f} ms, shared {now['shared']:.0%})"
            )
        print("2. a fresh worker, keyed picks in 10 hashed 100-node services (KiB)")
        mem_now = memory(path)
        with tables_disabled():
            mem_before = memory(path)
        mem_sub = memory(path, subsets=True)
        with tables_disabled():
            mem_sub_before = memory(path, subsets=True)
        for label, mem, start, end in (
            ("table published", mem_now, "picks", "keyed picks"),
            ("worker builds", mem_before, "picks", "keyed picks"),
            ("+2 subsets each, declared", mem_sub, "keyed picks", "keyed subset picks"),
            ("+2 subsets each, built", mem_sub_before, "keyed picks", "keyed subset picks"),
        ):
            a, b = mem[start], mem[end]
            assert isinstance(a, dict)
            assert isinstance(b, dict)
            shared = mem["subsets_shared"] if "subsets_shared" in mem else mem["shared"]
            print(
                f"  {label:26} private +{b['RssAnon'] - a['RssAnon']:6} KiB in all "
                f"({(b['RssAnon'] - a['RssAnon']) / 10:7.1f} per service), region pages "
                f"+{b['RssShmem'] - a['RssShmem']:5} KiB (shared); tables from the region: "
                f"{shared}/{20 if 'subsets_shared' in mem else 10}"
            )
        print(f"3. region size at {args.services} services x 100 nodes")
        sizes = []
        for h in map(int, args.hashed.split(",")):
            r = region_size(path, args.services, h)
            sizes.append(r)
            print(
                f"  {h:5} hashed: payload {r['payload_bytes'] / 2**20:7.1f} MiB + tables "
                f"{r['tables_bytes'] / 2**20:6.1f} MiB, region {r['region_bytes'] / 2**20:7.1f} "
                f"MiB = {r['region_over_payload']:5.2f} x payload, "
                f"{r['region_over_payload_and_tables']:4.2f} x (payload + tables); "
                f"full publish {r['full_publish_s']:5.1f} s"
            )
        write_json(
            args.json,
            {
                "first_keyed": picks,
                "memory_kib": {
                    "published": mem_now,
                    "worker_builds": mem_before,
                    "subsets_declared": mem_sub,
                    "subsets_built": mem_sub_before,
                },
                "region": sizes,
                "bars": {"first_keyed_pick_ms_100": 1.0, "private_kib_per_service": 50},
            },
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
