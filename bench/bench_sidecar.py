"""Sidecar merge + publish at scale: a full map and a 1-node delta, 10 000 services x 100 nodes.

Run: uv run python bench/bench_sidecar.py [--services N] [--nodes N] [--json PATH]

Measures what one poll costs the sidecar after the answer is decoded: applying it to the mirror
(digests and checksum check included), the protection decision, and the region publish. Then
the same through the daemon's one merge path of poll and stream answers (``Sidecar._apply``,
default settings: feedback and slow start on, metrics kept), in CPU time of this process: what
each change costs the sidecar's main loop before it can apply the next one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from common import machine, make_service, write_json

from clustermap.checksum import map_checksum, service_digest, update_checksum
from clustermap.model import Node, Service
from clustermap.region.writer import RegionWriter
from clustermap.sidecar.config import SidecarSettings
from clustermap.sidecar.daemon import Sidecar
from clustermap.sidecar.guard import Guard
from clustermap.sidecar.mirror import Mirror
from clustermap.wire import DELTA, FULL, PollAnswer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="cm-bench-")
    try:
        print(f"machine: {machine()}")
        services = [make_service(i, args.nodes) for i in range(args.services)]
        digests = {s.name: service_digest(s) for s in services}
        full = PollAnswer(FULL, "e", 1, map_checksum(digests.values()), tuple(services))
        mirror, guard = Mirror(), Guard()
        published: dict[str, Service] = {}
        with RegionWriter(os.path.join(d, "r.region")) as w:
            t0 = time.perf_counter()
            mirror.apply(full)
            t1 = time.perf_counter()
            decision = guard.decide(mirror.services, published, full=True)
            t2 = time.perf_counter()
            w.publish(decision.upserts, decision.removals)
            t3 = time.perf_counter()
            published = dict(mirror.services)
            t0_full, t1_full, t2_full, t3_full = t0, t1, t2, t3
            print(
                f"full {args.services} x {args.nodes}: merge {t1 - t0:.3f} s, protect "
                f"{t2 - t1:.3f} s, publish {t3 - t2:.3f} s, total {t3 - t0:.3f} s"
            )
            merge, total = [], []
            checksum = mirror.checksum
            for rev in range(2, 53):
                old = mirror.services[f"service-{rev:05d}"]
                new = Service(old.name, (*old.nodes[:-1], Node("10.255.0.1", 9999)), revision=rev)
                checksum = update_checksum(checksum, digests[old.name], service_digest(new))
                delta = PollAnswer(DELTA, "e", rev, checksum, (new,))
                t0 = time.perf_counter()
                change = mirror.apply(delta)
                t1 = time.perf_counter()
                decision = guard.decide(
                    mirror.services, published, full=False, changed=change.upserted
                )
                w.publish(decision.upserts, decision.removals)
                t2 = time.perf_counter()
                published[new.name] = new
                merge.append(t1 - t0)
                total.append(t2 - t0)
            print(
                f"1-node delta: merge {statistics.median(merge) * 1e3:.3f} ms, merge + protect + "
                f"publish {statistics.median(total) * 1e3:.3f} ms median, "
                f"{max(total) * 1e3:.3f} ms max (bar 5 ms)"
            )
            daemon_full_s, daemon_ms = _daemon_path(services, digests, d)
            print(
                f"through the sidecar daemon (Sidecar._apply, feedback on): full map "
                f"{daemon_full_s:.2f} s CPU, then a 1-node delta "
                f"{statistics.median(daemon_ms):.3f} ms CPU median, {max(daemon_ms):.3f} ms max"
            )
            write_json(
                args.json,
                {
                    "services": args.services,
                    "nodes": args.nodes,
                    "full_merge_s": t1_full - t0_full,
                    "full_protect_s": t2_full - t1_full,
                    "full_publish_s": t3_full - t2_full,
                    "full_total_s": t3_full - t0_full,
                    "delta_merge_ms": statistics.median(merge) * 1e3,
                    "delta_total_ms": statistics.median(total) * 1e3,
                    "delta_total_max_ms": max(total) * 1e3,
                    "daemon_full_cpu_s": daemon_full_s,
                    "daemon_delta_cpu_ms": statistics.median(daemon_ms),
                    "daemon_delta_cpu_max_ms": max(daemon_ms),
                },
            )
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _daemon_path(
    services: list[Service], digests: dict[str, int], d: str
) -> tuple[float, list[float]]:
    """CPU seconds of a full answer, and CPU ms of each of 51 one-node deltas, applied through
    the daemon's merge path to a region of their own."""
    digests = dict(digests)
    settings = SidecarSettings(region=os.path.join(d, "daemon.region"), server=["127.0.0.1:1"])
    car = Sidecar(settings)
    car.writer = RegionWriter(settings.region)
    try:
        car._start_feedback()
        checksum = map_checksum(digests.values())
        t0 = time.process_time()
        assert car._apply("bench", PollAnswer(FULL, "e", 1, checksum, tuple(services)))
        full_s = time.process_time() - t0
        cpu = []
        for rev in range(2, 53):
            old = car.mirror.services[f"service-{rev:05d}"]
            new = Service(old.name, (*old.nodes[:-1], Node("10.255.0.1", 9999)), revision=rev)
            checksum = update_checksum(checksum, digests[old.name], service_digest(new))
            digests[old.name] = service_digest(new)
            t0 = time.process_time()
            assert car._apply("bench", PollAnswer(DELTA, "e", rev, checksum, (new,)))
            cpu.append((time.process_time() - t0) * 1e3)
        return full_s, cpu
    finally:
        if car.feedback is not None:
            car.feedback.close()
        car.writer.close()


if __name__ == "__main__":
    main()
