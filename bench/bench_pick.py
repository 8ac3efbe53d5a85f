"""pick() per strategy against what users would do instead, all in one run.

Run: uv run python bench/bench_pick.py [--nodes 16]

Every figure is ns per call (the fastest of 7 runs: the least disturbed by other load on a shared
machine, as timeit advises) and its ratio to a bare Python function call that
takes the same arguments, measured in the same run (the bars of DESIGN §5 are stated that way).
Alternatives: a gRPC query to cm-server per request (the seed's option 1), a per-process TTL
cache refreshed from cm-server (option 2), and uhashring for consistent hashing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import grpc
from common import machine

import clustermap
from clustermap._pb.clustermap.v1 import (
    inspection_pb2,
    inspection_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from clustermap.model import Node, Service
from clustermap.region.writer import RegionWriter


def bench(stmt: str, g: dict[str, object], number: int) -> float:
    exec(stmt, g)  # warm: first use builds tables
    runs = timeit.repeat(stmt, globals=g, number=number, repeat=7)
    return min(runs) / number * 1e9


def bare(service: str, key: object = None, strategy: object = None) -> None:
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--number", type=int, default=300_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cm-bench-", dir="/dev/shm"))
    port = 17000 + int(time.time()) % 2000
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("cm-server")),
            "--listen",
            f"127.0.0.1:{port}",
            "--warmup",
            "0.1",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        nodes = tuple(Node(f"10.0.0.{i}", 8080, weight=1 + i % 3) for i in range(args.nodes))
        with RegionWriter(tmp / "r.region") as w:
            w.publish(
                [
                    Service("rr", nodes),
                    Service("weighted", nodes, strategy="weighted"),
                    Service("random", nodes, strategy="random"),
                    Service("hash", nodes, strategy="consistent_hash"),
                ]
            )
        cm = clustermap.open(tmp / "r.region")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=10)
        reg = registry_pb2_grpc.RegistryStub(channel)
        for n in nodes:
            for _ in range(50):
                try:
                    reg.Register(
                        registry_pb2.RegisterRequest(
                            service="rr", host=n.host, port=n.port, weight=n.weight, ttl_seconds=0
                        ),
                        timeout=2,
                    )
                    break
                except grpc.RpcError:
                    time.sleep(0.05)
        insp = inspection_pb2_grpc.InspectionStub(channel)

        def grpc_per_request() -> str:
            svc = insp.GetService(inspection_pb2.GetServiceRequest(name="rr"), timeout=2).service
            return svc.nodes[0].host

        ttl_cache: dict[str, tuple[float, list[str]]] = {}

        def ttl_cached(name: str) -> str:
            now = time.monotonic()
            hit = ttl_cache.get(name)
            if hit is None or hit[0] < now:
                svc = insp.GetService(inspection_pb2.GetServiceRequest(name=name), timeout=2)
                hit = (now + 1.0, [f"{n.host}:{n.port}" for n in svc.service.nodes])
                ttl_cache[name] = hit
            return hit[1][int(now * 1e6) % len(hit[1])]

        from uhashring import HashRing

        ring = HashRing(nodes=[n.address for n in nodes])
        pick = cm.pick
        g: dict[str, object] = {
            "bare": bare,
            "pick": pick,
            "ring": ring,
            "grpc_per_request": grpc_per_request,
            "ttl_cached": ttl_cached,
        }
        n = args.number
        rows = [
            ("bare call, 1 argument (baseline)", "bare('rr')", "bare('rr')"),
            ("bare call, 2 arguments (baseline)", "bare('hash', 'user:42')", None),
            ("bare call, keyword (baseline)", "bare('rr', strategy='random')", None),
            ("pick(), round_robin", "pick('rr')", "bare('rr')"),
            ("pick(), weighted (smooth WRR)", "pick('weighted')", "bare('rr')"),
            ("pick(), random", "pick('random')", "bare('rr')"),
            (
                "pick(strategy='random')",
                "pick('rr', strategy='random')",
                "bare('rr', strategy='random')",
            ),
            ("pick(key=...), Maglev", "pick('hash', 'user:42')", "bare('hash', 'user:42')"),
            ("uhashring get_node", "ring.get_node('user:42')", "bare('hash', 'user:42')"),
            ("per-process TTL cache (1 s), warm", "ttl_cached('rr')", "bare('rr')"),
            ("gRPC query to cm-server per request", "grpc_per_request()", "bare('rr')"),
        ]
        base: dict[str, float] = {}
        print(f"machine: {machine()}; {args.nodes} nodes per service")
        print(f"{'what':44} {'ns/call':>10} {'x bare':>8}")
        for label, stmt, baseline in rows:
            count = 2000 if "grpc" in stmt else n
            ns = bench(stmt, g, count)
            base[stmt] = ns
            ratio = f"{ns / base[baseline]:8.2f}" if baseline and baseline in base else ""
            print(f"{label:44} {ns:10.1f} {ratio}")
        channel.close()
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
