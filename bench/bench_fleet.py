"""One cm-server and a fleet of subscribers polling every 500 ms, as that many sidecars would.

Run: uv run python bench/bench_fleet.py [--subscribers 1000[,2000,...]] [--procs 4]
     [--duration 10] [--phases steady,churn] [--json PATH]

``--subscribers`` takes a comma-separated list: each fleet size is measured in turn against the
same server (a sweep), e.g. ``--subscribers 100,500,1000,2000,5000``.

Each subscriber has its own gRPC channel (its own connection) and polls with its own
(epoch, revision), every ``--interval`` seconds with 10 % jitter. Two phases:

* steady: nothing changes, every answer is NOT_MODIFIED;
* churn: one node changes every second, so each subscriber gets a 1-node DELTA about every
  other poll.

Reports the polls/s the server answered (the fleet asks for subscribers / interval), latency
percentiles, errors, and the server's CPU use. Clients share the 2 cores with the server, so
past the point where the machine is saturated the answered rate is a lower bound of what a
dedicated server host would answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
from common import cpu_seconds, machine, write_json

from clustermap._pb.clustermap.v1 import registry_pb2, registry_pb2_grpc, subscription_pb2_grpc
from clustermap._pb.clustermap.v1 import subscription_pb2 as spb


async def _subscriber(
    address: str, interval: float, until: float, out: list[tuple[float, int]], errors: list[str]
) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = subscription_pb2_grpc.SubscriptionStub(channel)
        epoch, revision = "", 0
        await asyncio.sleep(random.uniform(0, interval))
        while time.monotonic() < until:
            t0 = time.perf_counter()
            try:
                resp = await stub.Poll(spb.PollRequest(epoch=epoch, revision=revision), timeout=5)
            except grpc.aio.AioRpcError as exc:
                errors.append(exc.code().name)
            else:
                out.append((time.perf_counter() - t0, resp.kind))
                if resp.kind != spb.POLL_KIND_NOT_READY:
                    epoch, revision = resp.epoch, resp.revision
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))


def _client(address: str, n: int, interval: float, duration: float, nice: int, q: mp.Queue) -> None:
    if nice:
        os.nice(nice)

    async def run() -> tuple[list[tuple[float, int]], list[str]]:
        out: list[tuple[float, int]] = []
        errors: list[str] = []
        until = time.monotonic() + duration
        await asyncio.gather(
            *(_subscriber(address, interval, until, out, errors) for _ in range(n))
        )
        return out, errors

    q.put(asyncio.run(run()))


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, in ticks, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return float(sum(ticks) - idle), float(sum(ticks))


def _fleet(
    args: argparse.Namespace,
    address: str,
    reg: registry_pb2_grpc.RegistryStub,
    server_pid: int,
    subscribers: int,
) -> list[dict[str, object]]:
    """Every phase with ``subscribers`` subscribers; one result row per phase."""
    print(
        f"{subscribers} subscribers polling every {args.interval * 1e3:.0f} ms "
        f"(asks {subscribers / args.interval:.0f} polls/s)"
    )
    rows: list[dict[str, object]] = []
    for phase in args.phases.split(","):
        q: mp.Queue = mp.Queue()
        per = subscribers // args.procs
        procs = [
            mp.Process(
                target=_client,
                args=(address, per, args.interval, args.duration, args.client_nice, q),
            )
            for _ in range(args.procs)
        ]
        cpu0 = cpu_seconds(server_pid)
        busy0 = _machine_busy()
        t0 = time.monotonic()
        for p in procs:
            p.start()
        if phase == "churn":
            w = 1
            while time.monotonic() - t0 < args.duration:
                w += 1
                with contextlib.suppress(grpc.RpcError):  # an overloaded server sheds it too
                    reg.Register(
                        registry_pb2.RegisterRequest(
                            service="svc-000",
                            host="127.0.0.1",
                            port=10000,
                            weight=w % 100 + 1,
                            ttl_seconds=0,
                        ),
                        timeout=5,
                    )
                time.sleep(1.0)
        results = [q.get() for _ in procs]
        for p in procs:
            p.join()
        wall = time.monotonic() - t0
        cpu = cpu_seconds(server_pid) - cpu0
        busy = _machine_busy()
        machine_busy = (busy[0] - busy0[0]) / max(busy[1] - busy0[1], 1e-9)
        lat = sorted(x for out, _ in results for x, _ in out)
        kinds: dict[int, int] = {}
        for out, _ in results:
            for _, k in out:
                kinds[k] = kinds.get(k, 0) + 1
        errors = Counter(e for _, errs in results for e in errs)
        polls = len(lat)
        qs = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
        names = {
            spb.POLL_KIND_NOT_MODIFIED: "not_modified",
            spb.POLL_KIND_DELTA: "delta",
            spb.POLL_KIND_FULL: "full",
            spb.POLL_KIND_NOT_READY: "not_ready",
        }
        mix = {str(names.get(k, k)): v for k, v in sorted(kinds.items())}
        print(
            f"  {phase:7} {polls / args.duration:7.0f} polls/s answered; latency p50 "
            f"{qs[49] * 1e3:.1f} ms p99 {qs[98] * 1e3:.1f} ms; errors {dict(errors) or 0}; "
            f"server CPU {cpu / wall:.0%} of a core, {cpu / max(polls, 1) * 1e6:.0f} us/poll; "
            f"machine {machine_busy:.0%} busy"
            f"; {', '.join(f'{k} {v}' for k, v in mix.items())}"
        )
        rows.append(
            {
                "subscribers": per * args.procs,
                "phase": phase,
                "demand_polls_per_s": per * args.procs / args.interval,
                "answered_polls_per_s": polls / args.duration,
                "p50_ms": qs[49] * 1e3,
                "p99_ms": qs[98] * 1e3,
                "errors": sum(errors.values()),
                "errors_by_code": dict(errors),
                "machine_busy": machine_busy,
                "server_cpu_cores": cpu / wall,
                "server_cpu_us_per_poll": cpu / max(polls, 1) * 1e6,
                "kinds": mix,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subscribers", default="1000", help="a count, or a comma-separated sweep")
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--phases", default="steady,churn")
    ap.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="run the simulated subscribers at this nice level, so the server gets the CPU first",
    )
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    sizes = [int(x) for x in str(args.subscribers).split(",")]
    port = 18000 + os.getpid() % 2000
    address = f"127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("cm-server")), "--listen", address, "--warmup", "0.1"],
        stderr=subprocess.DEVNULL,
    )
    try:
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=15)
        reg = registry_pb2_grpc.RegistryStub(channel)
        time.sleep(0.3)  # past the 0.1 s warm-up
        for s in range(100):
            for k in range(10):
                reg.Register(
                    registry_pb2.RegisterRequest(
                        service=f"svc-{s:03d}", host="127.0.0.1", port=10000 + k, ttl_seconds=0
                    ),
                    timeout=5,
                )
        print(f"machine: {machine()}; map 100 services x 10 nodes")
        rows: list[dict[str, object]] = []
        for subscribers in sizes:
            rows += _fleet(args, address, reg, server.pid, subscribers)
        write_json(
            args.json,
            {
                "interval_s": args.interval,
                "procs": args.procs,
                "client_nice": args.client_nice,
                "rows": rows,
            },
        )
        channel.close()
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
