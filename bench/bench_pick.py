"""pick() per strategy against what users would do instead, all in one run.

Run: uv run python bench/bench_pick.py [--nodes 16] [--json PATH]

Every figure is ns per call (the fastest of ``--repeat`` runs: the least disturbed by other load
on a shared machine, as timeit advises) and its ratio to a bare Python function call that takes
the same arguments, timed in alternation with it (the bars of DESIGN §5 and §5b are stated that
way; the bars shown are §5b's). bench_callgrind.py counts the same picks in instructions.
Alternatives: a gRPC query to cm-server per request (the seed's option 1), a per-process TTL
cache refreshed from cm-server (option 2), uhashring for consistent hashing, and a name lookup
through the resolver (``socket.getaddrinfo("localhost")``, answered from /etc/hosts).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import grpc
from common import machine, routed, write_json

import clustermap
from clustermap._pb.clustermap.v1 import (
    inspection_pb2,
    inspection_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from clustermap.model import Node, Service
from clustermap.region.layout import Meta
from clustermap.region.writer import RegionWriter
from clustermap.sidecar.feedback import FeedbackHub
from clustermap.sidecar.outlier import OutlierPolicy


def bench(stmt: str, g: dict[str, object], number: int, repeat: int) -> float:
    exec(stmt, g)  # warm: first use builds tables
    runs = timeit.repeat(stmt, globals=g, number=number, repeat=repeat)
    return min(runs) / number * 1e9


def paired(
    stmt: str, baseline: str, g: dict[str, object], number: int, base_number: int, repeat: int
) -> tuple[float, float]:
    """ns per call of ``stmt`` and of its ``baseline``, timed in alternation, the fastest run of
    each: a burst of load from elsewhere on the machine then hits both alike."""
    exec(stmt, g)
    s_runs, b_runs = [], []
    for _ in range(repeat):
        b_runs.append(timeit.timeit(baseline, globals=g, number=base_number) / base_number)
        s_runs.append(timeit.timeit(stmt, globals=g, number=number) / number)
    return min(s_runs) * 1e9, min(b_runs) * 1e9


def bare(service: str, key: object = None, strategy: object = None) -> None:
    return None


def bare_s(
    service: str, key: object = None, strategy: object = None, subset: object = None
) -> None:
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--number", type=int, default=300_000)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--json", help="also write the figures to this file")
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
        # The sidecar's feedback files, so that least_request and call() run with feedback on.
        hub = FeedbackHub(
            str(tmp / "r.region"),
            rows=64,
            entries=64,
            capacity=4096,
            mode=0o660,
            group=None,
            policy=OutlierPolicy(),
        )
        with RegionWriter(tmp / "r.region") as w:
            w.publish(
                [
                    hub.decorate(s)
                    for s in [
                        Service("rr", nodes),
                        Service("weighted", nodes, strategy="weighted"),
                        Service("random", nodes, strategy="random"),
                        Service("hash", nodes, strategy="consistent_hash"),
                        Service("ketama", nodes, meta={"hash": "ketama"}),
                        *routed(nodes),
                    ]
                ],
                meta=Meta(zone="a"),  # the routing rows; the services above have no zones
            )
        cm = clustermap.open(tmp / "r.region")
        with cm.call("rr"):
            assert cm.feedback_status().startswith("on"), cm.feedback_status()
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
            "bare_s": bare_s,
            "pick": pick,
            "call": cm.call,
            "ring": ring,
            "grpc_per_request": grpc_per_request,
            "ttl_cached": ttl_cached,
            "getaddrinfo": socket.getaddrinfo,
        }
        n = args.number
        # (label, statement, baseline statement, bar as a multiple of the baseline, group)
        rows = [
            ("bare call, 1 argument (baseline)", "bare('rr')", "bare('rr')", None, "baseline"),
            (
                "bare call, 2 arguments (baseline)",
                "bare('hash', 'user:42')",
                None,
                None,
                "baseline",
            ),
            (
                "bare call, keyword (baseline)",
                "bare('rr', strategy='random')",
                None,
                None,
                "baseline",
            ),
            ("pick(), round_robin", "pick('rr')", "bare('rr')", 4, "clustermap"),
            ("pick(), weighted (smooth WRR)", "pick('weighted')", "bare('rr')", 4, "clustermap"),
            ("pick(), random", "pick('random')", "bare('rr')", 4, "clustermap"),
            (
                "pick(strategy='random')",
                "pick('rr', strategy='random')",
                "bare('rr', strategy='random')",
                4,
                "clustermap",
            ),
            (
                "pick(strategy='least_request')",
                "pick('rr', strategy='least_request')",
                "bare('rr', strategy='random')",
                10,
                "clustermap",
            ),
            (
                "with call(): pick, count in flight, record",
                "with call('rr'):\n    pass",
                "bare('rr')",
                15,
                "clustermap",
            ),
            (
                "pick(key=...), Maglev",
                "pick('hash', 'user:42')",
                "bare('hash', 'user:42')",
                6,
                "clustermap",
            ),
            (
                "pick(key=...), ketama (compat)",
                "pick('ketama', 'user:42')",
                "bare('hash', 'user:42')",
                None,
                "clustermap",
            ),
            (
                "pick(subset=...), round_robin",
                "pick('sub', subset={'version': 'v2'})",
                "bare_s('sub', subset={'version': 'v2'})",
                6,
                "clustermap",
            ),
            (
                "pick(key=..., subset=...), Maglev",
                "pick('sub', 'user:42', subset={'version': 'v2'})",
                "bare_s('sub', 'user:42', subset={'version': 'v2'})",
                6,
                "clustermap",
            ),
            (
                "pick(), round_robin in the local zone",
                "pick('zoned')",
                "bare('rr')",
                4,
                "clustermap",
            ),
            (
                "pick(subset=...) in the local zone",
                "pick('zoned', subset={'version': 'v2'})",
                "bare_s('zoned', subset={'version': 'v2'})",
                6,
                "clustermap",
            ),
            (
                "uhashring get_node",
                "ring.get_node('user:42')",
                "bare('hash', 'user:42')",
                None,
                "alternative",
            ),
            (
                "per-process TTL cache (1 s), warm",
                "ttl_cached('rr')",
                "bare('rr')",
                None,
                "alternative",
            ),
            (
                "socket.getaddrinfo('localhost')",
                "getaddrinfo('localhost', 8080)",
                "bare('rr')",
                None,
                "alternative",
            ),
            (
                "gRPC query to cm-server per request",
                "grpc_per_request()",
                "bare('rr')",
                None,
                "alternative",
            ),
        ]
        table: list[dict[str, object]] = []
        print(f"machine: {machine()}; {args.nodes} nodes per service")
        print(f"{'what':44} {'ns/call':>10} {'x bare':>8}  bar")
        for label, stmt, baseline, bar, group in rows:
            count = n
            if "grpc" in stmt:
                count = 2000
            elif "getaddrinfo" in stmt:
                count = 20_000
            if group == "baseline":
                ns, base_ns = bench(stmt, g, count, args.repeat), None
                ratio = 1.0 if baseline else None
            else:
                assert baseline is not None
                ns, base_ns = paired(stmt, baseline, g, count, n, args.repeat)
                ratio = ns / base_ns
            shown = f"{ratio:8.2f}" if ratio is not None else " " * 8
            print(f"{label:44} {ns:10.1f} {shown}  {f'{bar}x' if bar else ''}")
            table.append(
                {
                    "label": label,
                    "stmt": stmt,
                    "ns": ns,
                    "baseline": baseline,
                    "baseline_ns": base_ns,
                    "x_bare": ratio,
                    "bar": bar,
                    "group": group,
                }
            )
        write_json(args.json, {"nodes": args.nodes, "rows": table})
        channel.close()
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
