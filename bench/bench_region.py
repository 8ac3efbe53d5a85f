"""Region benchmark: reader checks and decodes, writer publishes at 10 000 x 100.

Run: uv run python bench/bench_region.py [--services N] [--nodes N] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from common import baseline_ns, machine, make_service, once_s, per_call_ns, write_json

from clustermap.model import Node, Service
from clustermap.region import layout as L
from clustermap.region.reader import RegionReader
from clustermap.region.writer import RegionWriter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="cm-bench-")
    path = os.path.join(d, "bench.region")
    try:
        print(f"machine: {machine()}")
        base = baseline_ns()
        print(f"bare function call: {base:.1f} ns (baseline)")

        services = [make_service(i, args.nodes) for i in range(args.services)]
        payload = sum(len(L.encode_service(s)) for s in services)
        with RegionWriter(path) as w:
            t0 = time.perf_counter()
            w.replace_all(services)
            full = time.perf_counter() - t0
            size = os.path.getsize(path)
            print(
                f"full publish {args.services} x {args.nodes}: {full:.3f} s "
                f"(bar 1 s); region {size / 2**20:.1f} MiB = {size / payload:.2f} x payload "
                f"{payload / 2**20:.1f} MiB (bar 1.5 x)"
            )
            rev = [1]

            def delta() -> None:
                rev[0] += 1
                s = services[rev[0] % len(services)]
                nodes = (*s.nodes[:-1], Node(s.nodes[-1].host, 9999, rev[0] % 7 + 1))
                w.publish([Service(s.name, nodes, revision=rev[0])])

            d_s = once_s(delta, repeat=51)
            print(f"1-node delta publish in that map: {d_s * 1e3:.3f} ms (bar 5 ms)")

            r = RegionReader(path)
            slot, version, _ = r.lookup("service-00042")
            words, idx = r.words, r.version_index(slot)

            def changed() -> bool:
                return words[idx] != version

            c = per_call_ns(changed)
            print(f"reader 'changed?' check: {c:.1f} ns = {c / base:.2f} x bare call")
            lk = per_call_ns(lambda: r.lookup("service-00042"), number=2000)
            print(
                f"validated read + decode of a {args.nodes}-node service: "
                f"{lk / 1e3:.1f} us (bar 150 us)"
            )
            meta_ns = per_call_ns(r.meta, number=20_000)
            print(f"read meta record: {meta_ns / 1e3:.2f} us")
            write_json(
                args.json,
                {
                    "services": args.services,
                    "nodes": args.nodes,
                    "bare_ns": base,
                    "full_publish_s": full,
                    "region_bytes": size,
                    "payload_bytes": payload,
                    "region_over_payload": size / payload,
                    "delta_publish_ms": d_s * 1e3,
                    "changed_check_ns": c,
                    "changed_check_x_bare": c / base,
                    "reread_us": lk / 1e3,
                    "meta_us": meta_ns / 1e3,
                },
            )
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
