"""Drive a cm-server from client threads for a while: requests/s, latency, server CPU.

bench_etcd.py and bench_register.py measure registration, heartbeats and polls the same way, so
the loop and the loads they share live here once: :func:`drive` gives each thread its own gRPC
channel, connected and warm (one call) before the clock starts, releases all threads at once and
has them call back to back for ``duration`` seconds; :func:`preload`, :func:`new_nodes` and
:func:`polls` are the map and the calls of their common scenarios.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Callable

import grpc
from common import cpu_seconds, pct

from clustermap import wire
from clustermap._pb.clustermap.v1 import registry_pb2, registry_pb2_grpc, subscription_pb2_grpc

__all__ = ["Make", "drive", "new_nodes", "polls", "preload"]

Make = Callable[[grpc.Channel, int], Callable[[], object]]
"""Given thread ``i``'s channel and ``i``, the call that thread repeats."""


def drive(
    address: str, threads: int, duration: float, make: Make, server_pid: int | None = None
) -> dict[str, float]:
    """Requests per second, p50 and p99 latency in ms, and with ``server_pid`` the server's CPU
    time per request in µs (``cpu_us``, user + system over the timed window)."""
    lat: list[list[float]] = [[] for _ in range(threads)]
    channels = [grpc.insecure_channel(address) for _ in range(threads)]
    calls = [make(ch, i) for i, ch in enumerate(channels)]
    for call in calls:  # connected and warm before the clock starts
        call()
    start = threading.Barrier(threads + 1)

    def run(i: int) -> None:
        start.wait()
        end = time.perf_counter() + duration
        out = lat[i]
        while (t0 := time.perf_counter()) < end:
            calls[i]()
            out.append(time.perf_counter() - t0)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    cpu0 = cpu_seconds(server_pid) if server_pid is not None else 0.0
    start.wait()
    for t in ts:
        t.join()
    cpu = cpu_seconds(server_pid) - cpu0 if server_pid is not None else 0.0
    for ch in channels:
        ch.close()
    all_lat = sorted(x for xs in lat for x in xs)
    figures = {
        "per_s": round(len(all_lat) / duration),
        "p50_ms": round(statistics.median(all_lat) * 1e3, 2),
        "p99_ms": round(pct(all_lat, 99) * 1e3, 2),
    }
    if server_pid is not None:
        figures["cpu_us"] = round(cpu / len(all_lat) * 1e6)
    return figures


def preload(registry: registry_pb2_grpc.RegistryStub) -> None:
    """The map the scenarios run against: services ``svc-000``..``svc-099``, 10 nodes each,
    no TTL."""
    for s in range(100):
        for n in range(10):
            registry.Register(
                registry_pb2.RegisterRequest(
                    service=f"svc-{s:03d}", host=f"10.0.{s}.{n}", port=80, ttl_seconds=0
                ),
                timeout=10,
            )


def new_nodes() -> Make:
    """Register calls, each a new node (no TTL) into one of 10 services ``reg-0``..``reg-9``.
    One counter for every thread and every scenario it serves, so no node is registered twice
    (12.5 million hosts, none in the preloaded 10.0/16)."""
    counter = itertools.count()

    def make(ch: grpc.Channel, i: int) -> Callable[[], object]:
        stub = registry_pb2_grpc.RegistryStub(ch)

        def call() -> object:
            k = next(counter)
            return stub.Register(
                registry_pb2.RegisterRequest(
                    service=f"reg-{k % 10}",
                    host=f"10.{1 + k // 62500 % 200}.{k // 250 % 250}.{k % 250}",
                    port=80,
                    ttl_seconds=0,
                ),
                timeout=10,
            )

        return call

    return make


def polls(epoch: str, revision: int) -> Make:
    """Poll calls of a subscriber that has ``epoch``/``revision`` (no Watch stream open)."""

    def make(ch: grpc.Channel, i: int) -> Callable[[], object]:
        stub = subscription_pb2_grpc.SubscriptionStub(ch)
        req = wire.poll_request(epoch, revision)
        return lambda: stub.Poll(req, timeout=10)

    return make
