"""One cm-server and a fleet of 1 000 subscribers polling every 500 ms, as 1 000 sidecars would.

Run: uv run python bench/bench_fleet.py [--subscribers 1000] [--procs 4] [--duration 10]

Each subscriber has its own gRPC channel (its own connection) and polls with its own
(epoch, revision), every ``--interval`` seconds with 10 % jitter. Two phases:

* steady: nothing changes, every answer is NOT_MODIFIED;
* churn: one node changes every second, so each subscriber gets a 1-node DELTA about every
  other poll.

Reports the polls/s the server answered (the fleet asks for subscribers / interval), latency
percentiles, errors, and the server's CPU use. Clients share the 2 cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
from common import machine

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


def _client(address: str, n: int, interval: float, duration: float, q: mp.Queue) -> None:
    async def run() -> tuple[list[tuple[float, int]], list[str]]:
        out: list[tuple[float, int]] = []
        errors: list[str] = []
        until = time.monotonic() + duration
        await asyncio.gather(
            *(_subscriber(address, interval, until, out, errors) for _ in range(n))
        )
        return out, errors

    q.put(asyncio.run(run()))


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--duration", type=float, default=10.0)
    args = ap.parse_args()
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
        print(f"machine: {machine()}")
        print(
            f"{args.subscribers} subscribers polling every {args.interval * 1e3:.0f} ms "
            f"(asks {args.subscribers / args.interval:.0f} polls/s); map 100 services x 10 nodes"
        )
        for phase in ("steady", "churn"):
            q: mp.Queue = mp.Queue()
            per = args.subscribers // args.procs
            procs = [
                mp.Process(target=_client, args=(address, per, args.interval, args.duration, q))
                for _ in range(args.procs)
            ]
            cpu0 = _cpu(server.pid)
            t0 = time.monotonic()
            for p in procs:
                p.start()
            if phase == "churn":
                w = 1
                while time.monotonic() - t0 < args.duration:
                    w += 1
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
            cpu = _cpu(server.pid) - cpu0
            lat = sorted(x for out, _ in results for x, _ in out)
            kinds: dict[int, int] = {}
            for out, _ in results:
                for _, k in out:
                    kinds[k] = kinds.get(k, 0) + 1
            errors = [e for _, errs in results for e in errs]
            polls = len(lat)
            qs = statistics.quantiles(lat, n=100)
            names = {
                spb.POLL_KIND_NOT_MODIFIED: "not_modified",
                spb.POLL_KIND_DELTA: "delta",
                spb.POLL_KIND_FULL: "full",
                spb.POLL_KIND_NOT_READY: "not_ready",
            }
            mix = ", ".join(f"{names.get(k, k)} {v}" for k, v in sorted(kinds.items()))
            print(
                f"{phase:7} {polls / args.duration:7.0f} polls/s answered; latency p50 "
                f"{qs[49] * 1e3:.1f} ms p99 {qs[98] * 1e3:.1f} ms; errors {len(errors)}; "
                f"server CPU {cpu / wall:.0%} of a core, {cpu / max(polls, 1) * 1e6:.0f} us/poll"
                f"; {mix}"
            )
        channel.close()
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
