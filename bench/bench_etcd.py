"""cm-server on etcd vs in memory: registration, heartbeat and poll throughput.

Starts a real ``cm-server`` with the in-memory store, then one on a real 3-member etcd cluster
(temp dirs, free loopback ports; needs the ``etcd`` binary), and drives each from ``--threads``
client threads (one channel each) for ``--duration`` seconds per scenario:

* ``register``: new nodes (no TTL) into 10 services, as fast as possible;
* ``heartbeat``: renewing existing leases;
* ``poll_not_modified`` / ``poll_delta``: a current subscriber, and one a single-node change
  behind (100 services × 10 nodes in the map).

Everything shares one 2-core machine (clients, server, etcd members), so read the figures as a
comparison, not as capacity. About 40 s.

    uv run python bench/bench_etcd.py [--threads 8 --duration 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from common import machine  # noqa: E402
from drive import drive  # noqa: E402

from clustermap import wire  # noqa: E402
from clustermap._pb.clustermap.v1 import (  # noqa: E402
    registry_pb2,
    registry_pb2_grpc,
    subscription_pb2_grpc,
)
from tests.integration.etcd.harness import start_cluster  # noqa: E402
from tests.support.stack import ServerProc  # noqa: E402


def scenarios(server: ServerProc, threads: int, duration: float) -> dict[str, dict[str, float]]:
    counter = itertools.count()
    for s in range(100):
        for n in range(10):
            server.register(f"svc-{s:03d}", f"10.0.{s}.{n}", 80)
    out: dict[str, dict[str, float]] = {}

    def register(ch: grpc.Channel, i: int) -> Callable[[], None]:
        stub = registry_pb2_grpc.RegistryStub(ch)

        def call() -> None:
            k = next(counter)
            stub.Register(
                registry_pb2.RegisterRequest(
                    service=f"reg-{k % 10}",
                    host=f"10.1.{k // 250 % 250}.{k % 250}",
                    port=80,
                    ttl_seconds=0,
                ),
                timeout=10,
            )

        return call

    out["register"] = drive(server.address, threads, duration, register)

    leases = [server.register("hb", f"10.2.0.{i}", 80, ttl=30).lease_id for i in range(threads)]

    def heartbeat(ch: grpc.Channel, i: int) -> Callable[[], None]:
        stub = registry_pb2_grpc.RegistryStub(ch)
        req = registry_pb2.HeartbeatRequest(lease_id=leases[i])
        return lambda: stub.Heartbeat(req, timeout=10) and None

    out["heartbeat"] = drive(server.address, threads, duration, heartbeat)

    probe = subscription_pb2_grpc.SubscriptionStub(grpc.insecure_channel(server.address))
    cur = wire.poll_answer_from_pb(probe.Poll(wire.poll_request(), timeout=10))

    def not_modified(ch: grpc.Channel, i: int) -> Callable[[], None]:
        stub = subscription_pb2_grpc.SubscriptionStub(ch)
        req = wire.poll_request(cur.epoch, cur.revision)
        return lambda: stub.Poll(req, timeout=10) and None

    out["poll_not_modified"] = drive(server.address, threads, duration, not_modified)

    server.register("svc-000", "10.0.0.0", 80, weight=2)

    def delta(ch: grpc.Channel, i: int) -> Callable[[], None]:
        stub = subscription_pb2_grpc.SubscriptionStub(ch)
        req = wire.poll_request(cur.epoch, cur.revision)
        return lambda: stub.Poll(req, timeout=10) and None

    out["poll_delta"] = drive(server.address, threads, duration, delta)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    server = ServerProc(ttl=10, warmup=0)
    try:
        results["memory"] = scenarios(server, a.threads, a.duration)
    finally:
        server.close()
    cluster = start_cluster(3)
    try:
        server = ServerProc("--store", cluster.url("bench"), ttl=10, warmup=0)
        try:
            results["etcd (3 members)"] = scenarios(server, a.threads, a.duration)
        finally:
            server.close()
    finally:
        cluster.close()
    print(f"{machine()}; {a.threads} client threads, {a.duration:g} s per scenario")
    print(f"{'scenario':<20}" + "".join(f"{store:>32}" for store in results))
    for name in next(iter(results.values())):
        cells = [
            f"{r[name]['per_s']:>8}/s p50 {r[name]['p50_ms']:>6} p99 {r[name]['p99_ms']:>6} ms"
            for r in results.values()
        ]
        print(f"{name:<20}" + "".join(f"{c:>32}" for c in cells))
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
