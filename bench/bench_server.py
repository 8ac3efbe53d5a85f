"""cm-server poll throughput with many concurrent real gRPC clients.

Starts a real ``cm-server`` (warm-up 0), fills it with ``--services`` × ``--nodes`` registered
nodes, then for each scenario runs ``--procs`` client processes × ``--threads`` threads, each
thread with its own channel, polling as fast as it can for ``--duration`` seconds:

* ``not_modified``: the subscriber is current (the steady state of a fleet of sidecars);
* ``delta_1node``: the subscriber is one revision behind, where one node of one service changed;
* ``full``: the subscriber has nothing (a sidecar starting), for reference.

Prints polls/s and latency percentiles per scenario; ``--json PATH`` also writes them. On the
2-core reference machine the default run takes well under 2 minutes. Clients share the CPU with
the server, so the figures are a lower bound of what a dedicated server host does.

    uv run python bench/bench_server.py [--procs 2 --threads 8 --duration 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from pathlib import Path

from common import cpu_seconds, run_info, start_server


def _client(
    address: str, epoch: str, revision: int, threads: int, duration: float, q: mp.Queue
) -> None:  # type: ignore[type-arg]
    import threading

    import grpc

    from clustermap._pb.clustermap.v1 import subscription_pb2, subscription_pb2_grpc

    results: list[tuple[int, list[float]]] = []
    start_at = time.monotonic() + 0.5

    def run() -> None:
        ch = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 256 << 20)]
        )
        stub = subscription_pb2_grpc.SubscriptionStub(ch)
        req = subscription_pb2.PollRequest(epoch=epoch, revision=revision)
        stub.Poll(req, timeout=10)  # connect before the clock starts
        lat: list[float] = []
        n = 0
        while time.monotonic() < start_at:
            time.sleep(0.001)
        end = start_at + duration
        while True:
            t0 = time.perf_counter()
            stub.Poll(req, timeout=10)
            lat.append(time.perf_counter() - t0)
            n += 1
            if time.monotonic() > end:
                break
        results.append((n, lat))
        ch.close()

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    q.put(results)


def _encode_scale(services: int, nodes: int) -> dict[str, float]:
    """In-process: what answering a big map costs the server (no network, no client)."""
    from clustermap.server.registry import Registry, StaticNode
    from clustermap.server.servicers import SubscriptionServicer
    from clustermap.server.serving import LoopThread
    from clustermap.server.store import MemoryStore
    from clustermap.server.validation import Registration

    clusters = {
        f"svc-{s:05d}": [
            StaticNode(f"10.{s // 250}.{s % 250}.{n}", 8080, 1, {"zone": "a"}) for n in range(nodes)
        ]
        for s in range(services)
    }
    store = MemoryStore()
    reg = Registry(store, warmup=0)
    t0 = time.perf_counter()
    reg.set_static(clusters)
    reg.set_probe_statuses(
        (name, n.host, n.port, "up") for name, ns in clusters.items() for n in ns
    )
    load = time.perf_counter() - t0
    loop = LoopThread(1)
    sv = SubscriptionServicer(reg, loop)
    t0 = time.perf_counter()
    first = sv.answer("", 0, None)[1]  # the blocking part of a Poll: registry call + encoding
    full_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    reg.register(Registration(service="svc-00001", host="10.255.0.1", port=1, ttl=0.0))
    change = time.perf_counter() - t0
    t0 = time.perf_counter()
    sv.answer("", 0, None)
    full_after = time.perf_counter() - t0
    epoch, rev = reg.epoch, reg.revision
    t0 = time.perf_counter()
    delta = sv.answer(epoch, rev - 1, None)[1]
    delta_t = time.perf_counter() - t0
    loop.stop()
    return {
        "static_load_s": load,
        "full_first_s": full_first,
        "full_bytes": len(first),
        "register_into_service_ms": change * 1e3,
        "full_after_1node_change_s": full_after,
        "delta_1node_ms": delta_t * 1e3,
        "delta_bytes": len(delta),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--services", type=int, default=100)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--server-workers", type=int, default=8)
    ap.add_argument("--scenarios", default="not_modified,delta_1node,full")
    ap.add_argument("--scale", default="10000x100", help="in-process encode test; 0 skips it")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import grpc

    from clustermap._pb.clustermap.v1 import (
        registry_pb2,
        registry_pb2_grpc,
        subscription_pb2,
        subscription_pb2_grpc,
    )

    server, address = start_server("--max-workers", str(args.server_workers))
    results: dict[str, dict[str, float]] = {}
    try:
        ch = grpc.insecure_channel(address)
        grpc.channel_ready_future(ch).result(timeout=15)
        reg = registry_pb2_grpc.RegistryStub(ch)
        sub = subscription_pb2_grpc.SubscriptionStub(ch)
        t0 = time.perf_counter()
        for s in range(args.services):
            for n in range(args.nodes):
                reg.Register(
                    registry_pb2.RegisterRequest(
                        service=f"svc-{s:05d}",
                        host=f"10.{s // 250}.{s % 250}.{n + 1}",
                        port=8080,
                        ttl_seconds=0,
                        meta={"zone": "a"},
                    )
                )
        fill = time.perf_counter() - t0
        print(
            f"registered {args.services * args.nodes} nodes in {fill:.2f}s "
            f"({args.services * args.nodes / fill:.0f}/s, one client)"
        )
        # one node changes: the subscriber one revision behind gets a 1-service delta
        reg.Register(
            registry_pb2.RegisterRequest(
                service="svc-00000", host="10.0.0.1", port=8080, weight=2, ttl_seconds=0
            )
        )
        full = sub.Poll(subscription_pb2.PollRequest())
        print(f"full map: {full.ByteSize()} bytes, revision {full.revision}")
        cases = {
            "not_modified": (full.epoch, full.revision),
            "delta_1node": (full.epoch, full.revision - 1),
            "full": ("", 0),
        }
        ctx = mp.get_context("spawn")
        for name in args.scenarios.split(","):
            epoch, revision = cases[name]
            q = ctx.Queue()
            procs = [
                ctx.Process(
                    target=_client, args=(address, epoch, revision, args.threads, args.duration, q)
                )
                for _ in range(args.procs)
            ]
            for p in procs:
                p.start()
            cpu0 = cpu_seconds(server.pid)
            gathered = [q.get(timeout=args.duration + 60) for _ in procs]
            for p in procs:
                p.join()
            counts = [n for per in gathered for n, _ in per]
            lat = sorted(x for per in gathered for _, ls in per for x in ls)
            total = sum(counts)
            cpu = cpu_seconds(server.pid) - cpu0
            qs = statistics.quantiles(lat, n=100) if len(lat) > 100 else [0.0] * 99
            results[name] = {
                "polls_per_s": total / args.duration,
                "p50_ms": qs[49] * 1e3,
                "p99_ms": qs[98] * 1e3,
                "clients": args.procs * args.threads,
                "server_cpu_us_per_poll": cpu / max(total, 1) * 1e6,
            }
            r = results[name]
            print(
                f"{name:>13}: {r['polls_per_s']:8.0f} polls/s  p50 {r['p50_ms']:6.2f} ms  "
                f"p99 {r['p99_ms']:6.2f} ms  server CPU {r['server_cpu_us_per_poll']:4.0f} us/poll"
                f"  ({r['clients']} concurrent clients)"
            )
        ch.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(15)
    if args.scale != "0":
        svcs, nodes = (int(x) for x in args.scale.split("x"))
        enc = _encode_scale(svcs, nodes)
        results["encode"] = enc
        print(
            f"in-process, {svcs} services x {nodes} nodes: loaded in {enc['static_load_s']:.1f} s;"
            f" full answer {enc['full_bytes'] / 1e6:.1f} MB, first {enc['full_first_s']:.2f} s,"
            " after a 1-node change"
            f" {enc['full_after_1node_change_s'] * 1e3:.0f} ms; 1-node delta"
            f" {enc['delta_1node_ms']:.2f} ms ({enc['delta_bytes']} B); registering into a"
            f" {nodes}-node service {enc['register_into_service_ms']:.2f} ms"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "info": run_info(),
                    "args": vars(args) | {"json": str(args.json)},
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
