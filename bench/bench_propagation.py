"""Propagation: a change on cm-server until pick() sees it, in 4 worker processes.

Run: uv run python bench/bench_propagation.py [--changes 60] [--interval 0.5] [--workers 4]

A real cm-server and cm-sidecar; each worker process checks its service view every millisecond
(as a busy worker serving requests would) and reports when it first sees each revision. Changes
are made at random moments so they fall anywhere in the sidecar's poll cycle. Bar (DESIGN §5):
p99 <= poll interval + 100 ms.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from common import machine

from clustermap._pb.clustermap.v1 import registry_pb2, registry_pb2_grpc

WORKER = """
import sys, time, clustermap
cm = None
while cm is None:
    try:
        cm = clustermap.open(sys.argv[1])
    except clustermap.ClusterMapError:
        time.sleep(0.01)
last = -1
print("ready", flush=True)
while True:
    try:
        rev = cm.service("prop").revision
    except clustermap.ClusterMapError:
        rev = -1
    if rev != last:
        print(rev, time.time_ns(), flush=True)
        last = rev
    time.sleep(0.001)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=60)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cm-bench-", dir="/dev/shm"))
    region = tmp / "r.region"
    bin_ = Path(sys.executable).parent
    port = 17000 + os.getpid() % 2000
    address = f"127.0.0.1:{port}"
    procs = []
    try:
        server = subprocess.Popen(
            [str(bin_ / "cm-server"), "--listen", address, "--warmup", "0.1"],
            stderr=subprocess.DEVNULL,
        )
        procs.append(server)
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=15)
        reg = registry_pb2_grpc.RegistryStub(channel)

        def register(port: int) -> int:
            for _ in range(100):
                try:
                    resp = reg.Register(
                        registry_pb2.RegisterRequest(
                            service="prop", host="127.0.0.1", port=port, ttl_seconds=0
                        ),
                        timeout=2,
                    )
                    return int(resp.revision)
                except grpc.RpcError:
                    time.sleep(0.05)
            raise RuntimeError("cm-server did not accept a registration")

        register(1)
        procs.append(
            subprocess.Popen(
                [
                    str(bin_ / "cm-sidecar"),
                    "--server",
                    address,
                    "--region",
                    str(region),
                    "--interval",
                    str(args.interval),
                ],
                stderr=subprocess.DEVNULL,
            )
        )
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(region)], stdout=subprocess.PIPE, text=True
            )
            for _ in range(args.workers)
        ]
        procs += workers
        for w in workers:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "ready"
        sent: dict[int, int] = {}
        for i in range(args.changes):
            time.sleep(random.uniform(0.1, 2 * args.interval))
            t0 = time.time_ns()
            sent[register(2 + i)] = t0
        time.sleep(args.interval + 1.0)
        for w in workers:
            w.terminate()
        latencies: list[float] = []
        for w in workers:
            out, _ = w.communicate()
            seen = sorted((int(r), int(t)) for r, t in (line.split() for line in out.splitlines()))
            for r, t0 in sent.items():
                # A worker skips a revision when two changes land in one poll: the earlier
                # change became visible when the first later revision did.
                t = next((t for rev, t in seen if rev >= r), None)
                if t is None:
                    raise AssertionError(f"a worker never saw revision {r}")
                latencies.append((t - t0) / 1e6)
        latencies.sort()
        q = statistics.quantiles(latencies, n=100)
        print(f"machine: {machine()}")
        print(
            f"poll interval {args.interval * 1e3:.0f} ms, {args.workers} workers, "
            f"{len(latencies)} observations of {len(sent)} changes: "
            f"p50 {q[49]:.0f} ms, p90 {q[89]:.0f} ms, p99 {q[98]:.0f} ms, "
            f"max {latencies[-1]:.0f} ms "
            f"(bar p99 <= {args.interval * 1e3 + 100:.0f} ms)"
        )
        channel.close()
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
