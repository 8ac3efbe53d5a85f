"""Drive a cm-server from client threads for a while: requests/s, latency, server CPU.

bench_etcd.py and bench_register.py measure registration, heartbeats and polls the same way, so
the loop lives here once: one gRPC channel per thread, each connected and warm (one call) before
the clock starts, all threads released at once, calling back to back for ``duration`` seconds.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import grpc
from common import cpu_seconds, pct

__all__ = ["Make", "drive"]

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
