"""One cm-server process holding thousands of Watch streams: idle cost and fan-out latency.

Run: uv run python bench/bench_streams.py [--streams 1000,2000,5000] [--procs 4]
     [--client raw|raw-bdp|grpc] [--per-connection 1] [--idle 10] [--changes 20] [--pin]
     [--json PATH]

The figures of record (docs/performance.md §4b), on a quiet machine with at least 2 cores:
``uv run python bench/bench_streams.py --pin`` (about 4 minutes).

For each stream count N (a sweep against one server with 100 services x 10 nodes), ``--procs``
client processes open N/procs Watch streams each, one TCP connection per stream (as one per
sidecar), and read the first answer (the full map) on every stream. The clients stand in for
sidecars on as many other machines, but here they share the machine with the server, so they
must cost far less than it (``--client``):

* ``raw`` (the default, h2_watch.py): plain HTTP/2 on non-blocking sockets, one epoll loop per
  process, ~11-13 us of CPU per message received. It sends what the sidecar's Watch channel sends
  after its request (``STREAM_OPTIONS`` in sidecar/watcher.py: no bandwidth-delay probe, a
  window far larger than a delta): nothing but acknowledgements of the server's SETTINGS and
  PINGs. Arrivals are stamped once per wake-up, which comes at most ~1 ms after the message;
* ``raw-bdp``: the same, answering each read of data as a gRPC client with its bandwidth-delay
  probe on does (gRPC's default, and the sidecar's before it turned the probe off): window
  credits and a PING, which the server parses and answers, work of its own per message
  (~30 us per message received);
* ``grpc``: grpc.aio channels with the sidecar's options (~110 us per message, more than the
  server spends sending it: at 5 000 streams the latencies measure the clients);
  ``--per-connection`` streams share one TCP connection.

Then:

* **idle**: for ``--idle`` seconds (20: longer than the keepalive period) nothing changes; the
  server's CPU (utime + stime from /proc/PID/stat) over that window, as a share of one core.
  Streams still get their NOT_MODIFIED keepalives (every 15 s, cm-server's default), so this is
  the real idle cost;
* **memory**: the server's RSS with the streams open, minus its RSS before they were opened,
  per stream;
* **fan-out**: ``--changes`` times, one node's weight changes (UpdateNode) and every stream
  records when the delta of that revision arrives; latency = arrival - the moment before the
  UpdateNode call (one clock: one machine). p50 / p99 over every (stream, change), and of the
  last stream to get each change. A stream that skipped a revision (collapsed to a later one)
  counts as missing. The server's CPU during the changes (all its threads), per message
  delivered and per change, is the fan-out's cost; the busiest thread's share (the event
  loop, which holds the GIL for every message's Python part) is its floor when gRPC's own
  threads (poller, event engine) have another core. The client processes' CPU per change is
  shown too: when it nears their cores' time, the latencies measure the clients.

The clients share the machine with the server (and on the reference machine with other work:
the load average is recorded), so latencies include the clients' own scheduling. ``--pin``
puts the server (all its threads) on the first CPU and the clients on the others, so the
server's CPU figures are its own; CPU seconds are what other load distorts least. ``--pin 2``
gives the server two CPUs (its event loop on one, gRPC's poller and event-engine threads
mostly on the other), on a machine with at least 3. A stream
refused while opening is retried (up to 5 times), as a sidecar would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from pathlib import Path

import grpc
import h2_watch
from common import cpu_seconds, machine, pct, raise_nofile, start_server, write_json

from clustermap._pb.clustermap.v1 import registry_pb2, registry_pb2_grpc
from clustermap._pb.clustermap.v1 import subscription_pb2 as spb
from clustermap.sidecar.watcher import STREAM_OPTIONS

WATCH = "/clustermap.v1.Subscription/Watch"
OPEN_ATTEMPTS = 5


def _client(
    address: str, n: int, per_conn: int, ready: mp.Queue, stop: mp.Event, out: mp.Queue
) -> None:
    raise_nofile()

    async def run() -> tuple[list[tuple[int, float]], int]:
        options = [
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", 1 << 26),
            *STREAM_OPTIONS,  # the sidecar's own (no bandwidth-delay probe)
        ]
        channels = [
            grpc.aio.insecure_channel(address, options=options)
            for _ in range(math.ceil(n / per_conn))
        ]
        arrivals: list[tuple[int, float]] = []
        errors = 0
        opened = asyncio.Event()
        count = 0

        async def one(channel: grpc.aio.Channel) -> None:
            nonlocal count, errors
            first = True
            for attempt in range(OPEN_ATTEMPTS):  # a stream refused while opening is retried,
                call = channel.unary_stream(  # as a sidecar retries it
                    WATCH,
                    request_serializer=spb.PollRequest.SerializeToString,
                    response_deserializer=spb.PollResponse.FromString,
                )(spb.PollRequest())
                try:
                    async for msg in call:
                        if first:
                            first = False
                            count += 1
                            if count == n:
                                opened.set()
                        elif msg.kind in (spb.POLL_KIND_DELTA, spb.POLL_KIND_FULL):
                            arrivals.append((msg.revision, time.time()))
                except grpc.aio.AioRpcError as exc:
                    if first and attempt == OPEN_ATTEMPTS - 1:
                        print(f"stream not opened: {exc.code().name}", file=sys.stderr)
                except asyncio.CancelledError:
                    return
                if not first:
                    return
                await asyncio.sleep(0.5 + random.random())
            errors += 1  # never got its first answer
            count += 1
            if count == n:
                opened.set()

        tasks = []
        for i in range(n):
            tasks.append(asyncio.ensure_future(one(channels[i // per_conn])))
            if i % 100 == 99:
                await asyncio.sleep(0.05)  # do not open thousands of connections in one burst
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(opened.wait(), 300)
        ready.put(errors + n - count)  # streams that never answered count as errors
        while not stop.is_set():
            await asyncio.sleep(0.2)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
        return arrivals, errors

    out.put(asyncio.run(run()))


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    return out


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each of the process's threads so far (threads that ended are left out)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out[int(task.name)] = cpu_seconds(pid, int(task.name))
    return out


def _round(
    address: str, pid: int, reg: registry_pb2_grpc.RegistryStub, n: int, args: argparse.Namespace
) -> dict[str, float]:
    ctx = mp.get_context("spawn")  # the parent holds gRPC channels: no fork
    ready, out, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    base = _proc_status(pid)
    share = [n // args.procs + (1 if i < n % args.procs else 0) for i in range(args.procs)]
    client, extra = {
        "raw": (h2_watch.client, (False,)),
        "raw-bdp": (h2_watch.client, (True,)),
        "grpc": (_client, ()),
    }[args.client]
    procs = [
        ctx.Process(target=client, args=(address, k, args.per_connection, ready, stop, out, *extra))
        for k in share
        if k
    ]
    t_open = time.monotonic()
    for p in procs:
        p.start()
    open_errors = sum(ready.get(timeout=600) for _ in procs)
    opened_s = time.monotonic() - t_open
    time.sleep(2)  # let the opening burst settle
    held = _proc_status(pid)
    load_before = os.getloadavg()[0]
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(args.idle)
    idle_cpu = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
    load = os.getloadavg()[0]

    sent: dict[int, float] = {}
    c1, threads1 = cpu_seconds(pid), _thread_cpu(pid)
    k1 = sum(cpu_seconds(p.pid) for p in procs if p.pid is not None)
    for i in range(args.changes):
        t = time.time()
        resp = reg.UpdateNode(
            registry_pb2.UpdateNodeRequest(
                service="svc-00000", host="10.0.0.1", port=8080, weight=2 + i % 2
            ),
            timeout=30,
        )
        sent[resp.revision] = t
        time.sleep(args.spacing)
    time.sleep(2)
    busy = cpu_seconds(pid) - c1  # all of it: keepalives are not due while changes keep coming
    threads2 = _thread_cpu(pid)
    clients_busy = sum(cpu_seconds(p.pid) for p in procs if p.pid is not None) - k1
    # the event loop's thread is the busiest: with a core of its own for gRPC's other threads,
    # its CPU per change is the fan-out's floor (it holds the GIL for all the Python work)
    loop_busy = max((threads2[t] - threads1.get(t, 0.0) for t in threads2), default=0.0)
    stop.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    lat: list[float] = []
    per_change: dict[int, list[float]] = {r: [] for r in sent}
    for arrivals, _ in results:
        for revision, at in arrivals:
            if revision in sent:
                per_change[revision].append(at - sent[revision])
    for xs in per_change.values():
        lat.extend(xs)
    missing = n * len(sent) - len(lat)
    last = [max(xs) for xs in per_change.values() if xs]
    row = {
        "streams": n,
        "open_errors": open_errors,
        "opened_s": round(opened_s, 1),
        "threads": held["Threads"],
        "rss_base_mib": round(base["VmRSS"] / 1024, 1),
        "rss_held_mib": round(held["VmRSS"] / 1024, 1),
        "kib_per_stream": round((held["VmRSS"] - base["VmRSS"]) / n, 1),
        "idle_cpu_pct": round(100 * idle_cpu, 2),
        "p50_ms": round(1e3 * pct(lat, 50), 1),
        "p99_ms": round(1e3 * pct(lat, 99), 1),
        "max_ms": round(1e3 * max(lat, default=float("nan")), 1),
        "all_p50_ms": round(1e3 * statistics.median(last), 1) if last else float("nan"),
        "all_p99_ms": round(1e3 * pct(last, 99), 1),
        "missing": missing,
        "cpu_us_per_message": round(1e6 * busy / max(1, len(lat)), 1),
        "cpu_ms_per_change": round(1e3 * busy / max(1, len(sent)), 1),
        "loop_cpu_ms_per_change": round(1e3 * loop_busy / max(1, len(sent)), 1),
        "clients_cpu_ms_per_change": round(1e3 * clients_busy / max(1, len(sent)), 1),
        "load_avg": round((load_before + load) / 2, 1),
    }
    print(
        f"{n:>6} streams: threads {row['threads']}, RSS {row['rss_base_mib']} -> "
        f"{row['rss_held_mib']} MiB ({row['kib_per_stream']} KiB/stream), idle CPU "
        f"{row['idle_cpu_pct']} % of a core; change -> stream p50 {row['p50_ms']} ms, p99 "
        f"{row['p99_ms']} ms; -> all streams p50 {row['all_p50_ms']} ms, p99 "
        f"{row['all_p99_ms']} ms; server CPU {row['cpu_us_per_message']} us per message sent "
        f"({row['cpu_ms_per_change']} ms per change, of which the loop thread "
        f"{row['loop_cpu_ms_per_change']} ms; the clients {row['clients_cpu_ms_per_change']} ms); "
        f"missing {missing}, open errors {open_errors}; "
        f"load avg {row['load_avg']}",
        flush=True,
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1000,2000,5000")
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument(
        "--client",
        choices=("raw", "raw-bdp", "grpc"),
        default="raw",
        help="raw: plain HTTP/2 on sockets, one epoll loop per process, sending what the "
        "sidecar's Watch channel sends (h2_watch.py); raw-bdp: the same, answering data as a "
        "grpc client with its bandwidth-delay probe on (window updates, a PING); grpc: "
        "grpc.aio channels, which cost more per message than the server",
    )
    ap.add_argument("--per-connection", type=int, default=1, help="> 1 needs --client grpc")
    ap.add_argument("--idle", type=float, default=20.0, help="longer than the 15 s keepalive")
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--spacing", type=float, default=2.0, help="seconds between changes")
    ap.add_argument("--services", type=int, default=100)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument(
        "--pin",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="N",
        help="server on the first N CPUs (1 without N), clients on the others",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.client != "grpc" and args.per_connection != 1:
        print("--per-connection > 1 needs --client grpc", file=sys.stderr)
        return 2
    nofile = raise_nofile()
    counts = [int(x) for x in args.streams.split(",")]
    if max(counts) // args.per_connection + 100 > nofile:
        print(
            f"open files limit {nofile} is too low for {max(counts)} connections", file=sys.stderr
        )
        return 2

    if args.pin:  # the server on the first CPUs, the clients (and this process) on the others
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) <= args.pin:
            print(f"--pin {args.pin} needs at least {args.pin + 1} CPUs", file=sys.stderr)
            return 2
        os.sched_setaffinity(0, set(cpus[: args.pin]))
    server, address = start_server("--max-watchers", str(max(counts) + 100))
    if args.pin:
        os.sched_setaffinity(0, set(cpus[args.pin :]))
    rows = []
    try:
        ch = grpc.insecure_channel(address)
        grpc.channel_ready_future(ch).result(timeout=30)
        reg = registry_pb2_grpc.RegistryStub(ch)
        for s in range(args.services):
            for k in range(args.nodes):
                reg.Register(
                    registry_pb2.RegisterRequest(
                        service=f"svc-{s:05d}",
                        host=f"10.0.{s}.{k + 1}",
                        port=8080,
                        ttl_seconds=0,
                        meta={"zone": "a"},
                    ),
                    timeout=30,
                )
        print(f"{machine()}; cm-server pid {server.pid}; open files limit {nofile}", flush=True)
        for n in counts:
            rows.append(_round(address, server.pid, reg, n, args))
            time.sleep(3)  # the previous round's streams end
    finally:
        server.terminate()
        server.wait(30)
    write_json(
        str(args.json) if args.json else None,
        {"bench": "streams", "machine": machine(), "rows": rows},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
