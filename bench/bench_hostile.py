"""cm-server under hostile clients: Register latency before, during and after an attack.

Starts a real ``cm-server`` (warm-up 0) with ``--services`` registered services and measures the
latency of Register calls (one client, back to back, ``--samples`` each) in three phases of one
run, so the figures compare as ratios against the idle baseline:

* ``idle``: nothing else running (the baseline);
* ``filtered_polls``: ``--pollers`` threads send full polls naming ``--filter`` services each
  (before issue 17 these sorted the whole map under the registry's lock: Register p50 went from
  2 ms to 2.4 s);
* ``after_churn``: after ``--cycles`` open/cancel cycles of each streaming RPC (health Watch,
  reflection, Subscription Watch), the attack that used to wedge the server for good.

The target (issue 17) is that the server still answers within 100 ms: p99 of each phase is
printed against it. ``--json PATH`` writes the figures.

    uv run python bench/bench_hostile.py [--services 10000 --filter 10000 --pollers 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from common import free_port, pct, run_info
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clustermap._pb.clustermap.v1 import (
    registry_pb2,
    registry_pb2_grpc,
    subscription_pb2,
    subscription_pb2_grpc,
)

TARGET_MS = 100.0


def _latencies(stub: registry_pb2_grpc.RegistryStub, samples: int) -> list[float]:
    out = []
    for i in range(samples):
        req = registry_pb2.RegisterRequest(service="probe", host="10.255.0.1", port=1 + i % 1000)
        t = time.perf_counter()
        stub.Register(req, timeout=60)
        out.append((time.perf_counter() - t) * 1000)
    return out


def _summary(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {
        "p50_ms": statistics.median(ms),
        "p99_ms": pct(ms, 99),
        "max_ms": ms[-1],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--filter", type=int, default=10_000)
    ap.add_argument("--pollers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--cycles", type=int, default=2_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    address = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("cm-server")),
            "--listen",
            address,
            "--warmup",
            "0",
            "--heartbeat-ttl",
            "600",
            "--max-services",
            str(args.services + 10),
            "--log-level",
            "warning",
        ],
        start_new_session=True,
    )
    results: dict[str, object] = {"run": run_info(), "target_ms": TARGET_MS}
    try:
        ch = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)])
        grpc.channel_ready_future(ch).result(timeout=30)
        reg = registry_pb2_grpc.RegistryStub(ch)
        for i in range(args.services):
            reg.Register(
                registry_pb2.RegisterRequest(service=f"svc-{i}", host="10.0.0.1", port=80),
                timeout=60,
            )
        phases: dict[str, dict[str, float]] = {}
        phases["idle"] = _summary(_latencies(reg, args.samples))

        stop = threading.Event()
        names = [f"svc-{i}" for i in range(args.filter)]

        def poll() -> None:
            own = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)])
            sub = subscription_pb2_grpc.SubscriptionStub(own)
            while not stop.is_set():
                sub.Poll(subscription_pb2.PollRequest(services=names), timeout=120)
            own.close()

        threads = [threading.Thread(target=poll) for _ in range(args.pollers)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # let the pollers get going
        phases["filtered_polls"] = _summary(_latencies(reg, args.samples))
        stop.set()
        for t in threads:
            t.join()

        health = health_pb2_grpc.HealthStub(ch)
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        sub = subscription_pb2_grpc.SubscriptionStub(ch)
        for i in range(args.cycles):
            for call in (
                health.Watch(health_pb2.HealthCheckRequest(), timeout=30),
                refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
                ),
                sub.Watch(subscription_pb2.PollRequest(services=["svc-0"]), timeout=30),
            ):
                if i % 2:
                    with contextlib.suppress(grpc.RpcError):
                        next(call)
                call.cancel()
        phases["after_churn"] = _summary(_latencies(reg, args.samples))
        results["phases"] = phases
        base = phases["idle"]["p50_ms"]
        print(f"cm-server, {args.services} services; Register latency (ms), {args.samples} calls")
        print(f"{'phase':<16} {'p50':>8} {'p99':>8} {'max':>8} {'p50/idle':>9}  p99 <= 100 ms")
        for name, s in phases.items():
            ok = "yes" if s["p99_ms"] <= TARGET_MS else "NO"
            print(
                f"{name:<16} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {s['max_ms']:8.2f} "
                f"{s['p50_ms'] / base:9.1f}  {ok}"
            )
        ch.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            print("cm-server did not stop on SIGTERM", file=sys.stderr)
            return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
