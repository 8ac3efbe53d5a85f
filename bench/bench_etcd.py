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
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from common import machine  # noqa: E402
from drive import drive, new_nodes, polls, preload  # noqa: E402

from clustermap import wire  # noqa: E402
from clustermap._pb.clustermap.v1 import (  # noqa: E402
    registry_pb2,
    registry_pb2_grpc,
    subscription_pb2_grpc,
)
from tests.integration.etcd.harness import start_cluster  # noqa: E402
from tests.support.stack import ServerProc  # noqa: E402


def scenarios(server: ServerProc, threads: int, duration: float) -> dict[str, dict[str, float]]:
    preload(server.registry)
    out: dict[str, dict[str, float]] = {}

    out["register"] = drive(server.address, threads, duration, new_nodes())

    leases = [server.register("hb", f"10.2.0.{i}", 80, ttl=30).lease_id for i in range(threads)]

    def heartbeat(ch: grpc.Channel, i: int) -> Callable[[], None]:
        stub = registry_pb2_grpc.RegistryStub(ch)
        req = registry_pb2.HeartbeatRequest(lease_id=leases[i])
        return lambda: stub.Heartbeat(req, timeout=10) and None

    out["heartbeat"] = drive(server.address, threads, duration, heartbeat)

    with grpc.insecure_channel(server.address) as ch:
        probe = subscription_pb2_grpc.SubscriptionStub(ch)
        cur = wire.poll_answer_from_pb(probe.Poll(wire.poll_request(), timeout=10))
    current = polls(cur.epoch, cur.revision)

    out["poll_not_modified"] = drive(server.address, threads, duration, current)

    server.register("svc-000", "10.0.0.0", 80, weight=2)

    out["poll_delta"] = drive(server.address, threads, duration, current)  # now 1 node behind
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
