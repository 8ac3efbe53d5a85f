"""Propagation: a change on cm-server until pick() sees it, in every worker process.

Run: uv run python bench/bench_propagation.py [--mode processes|gunicorn] [--changes 60]
     [--interval 0.5] [--workers N] [--subscribe poll|watch|both] [--json PATH]

A real cm-server and cm-sidecar (poll mode, ``--interval``; ``--subscribe watch``: ``--watch``,
one Watch stream; ``both``: two sidecars on two regions, each with its own workers, following the
same server through the same changes, side by side). Each change registers one more node
of service ``prop``; changes are made at random moments so they fall anywhere in the sidecar's
poll cycle. Two kinds of workers:

* ``processes`` (default, 4 workers): plain processes that check their view every millisecond,
  as a busy worker serving requests would, and report when they first see each change;
* ``gunicorn`` (8 workers): real gunicorn sync workers running ``bench/prop_app.py``, kept busy
  by HTTP clients on loopback; each answer says which changes the worker's pick() saw and when.
  The latency then includes waiting for the worker's next request (its median gap is printed).

A worker that first sees change ``r`` together with later ones is counted at that moment (two
changes in one poll). Bars: poll p99 <= poll interval + 100 ms (DESIGN §5); watch p99 <= 20 ms
(issue 14).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import grpc
from common import free_port, machine, write_json

from clustermap import trace
from clustermap._pb.clustermap.v1 import registry_pb2, registry_pb2_grpc
from clustermap.errors import ClusterMapError
from clustermap.region.reader import RegionReader

HERE = Path(__file__).resolve().parent

WORKER = """
import sys, time, clustermap
cm = None
while cm is None:
    try:
        cm = clustermap.open(sys.argv[1])
    except clustermap.ClusterMapError:
        time.sleep(0.01)
last = -1
print("ready", flush=True)
while True:
    try:
        seen = max(n.port for n in cm.nodes("prop"))
    except (clustermap.ClusterMapError, ValueError):
        seen = -1
    if seen != last:
        print(seen, time.time_ns(), flush=True)
        last = seen
    time.sleep(0.001)
"""


def _stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """SIGTERM the process's session (it was started in its own), SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Processes:
    """Plain worker processes polling their view every millisecond."""

    def __init__(
        self, region: Path, workers: int, nice: int, procs: list[subprocess.Popen[str]]
    ) -> None:
        self.workers = [
            subprocess.Popen(
                _niced([sys.executable, "-c", WORKER, str(region)], nice),
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            for _ in range(workers)
        ]
        procs += self.workers
        for w in self.workers:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "ready"

    def picks(self) -> list[list[tuple[int, int, int, int]]]:
        """Per worker: (highest port seen, time_ns, time_ns, 0) each time it changed (a worker
        looks every millisecond and reports only changes: no time before, no CPU time)."""
        out = []
        for w in self.workers:
            w.terminate()
            text, _ = w.communicate()
            out.append(
                sorted(
                    (int(p), int(t), int(t), 0)
                    for p, t in (ln.split() for ln in text.split("\n") if ln)
                )
            )
        return out

    def gaps_ms(self) -> float:
        return 1.0


CLIENT = """
import http.client, os, sys, threading, time
port, threads, nice = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if nice:
    os.nice(nice)
answers = []
stop = threading.Event()

def load():
    while not stop.is_set():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            answers.append(conn.getresponse().read().decode())
        except (OSError, http.client.HTTPException):
            time.sleep(0.01)
        finally:
            conn.close()

threads = [threading.Thread(target=load, daemon=True) for _ in range(threads)]
for t in threads:
    t.start()
print("ready", flush=True)
sys.stdin.read()  # until the benchmark closes it
stop.set()
for t in threads:
    t.join(10)
sys.stdout.write("\\n".join(answers))
"""


class Gunicorn:
    """gunicorn sync workers serving bench/prop_app.py, kept busy by HTTP clients on loopback.

    The clients run in processes of their own (``threads`` each, at ``nice``), standing in for
    clients on other machines: they neither share the benchmark's GIL (its clock starts each
    change) nor, niced, take the CPU from the server, the sidecar and the workers."""

    def __init__(
        self,
        region: Path,
        workers: int,
        clients: int,
        nice: int,
        product_nice: int,
        procs: list[subprocess.Popen[str]],
    ) -> None:
        self.port = free_port()
        env = dict(os.environ, CLUSTERMAP_REGION=str(region))
        env.pop(trace.ENV, None)  # the workers' sightings come back in their answers
        self.master = subprocess.Popen(
            _niced(
                [
                    str(Path(sys.executable).with_name("gunicorn")),
                    "--workers",
                    str(workers),
                    "--worker-class",
                    "sync",
                    "--bind",
                    f"127.0.0.1:{self.port}",
                    "--chdir",
                    str(HERE),
                    "--log-level",
                    "warning",
                    "prop_app:app",
                ],
                product_nice,
            ),
            env=env,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        procs.append(self.master)
        self.workers = workers
        #: (pid, highest port seen, time_ns after the pick, time_ns before it, its CPU ns)
        self.answers: list[tuple[int, int, int, int, int]] = []
        deadline = time.monotonic() + 30
        while True:
            pids = set()
            for _ in range(4 * workers):
                got = self._get()
                if got:
                    pids.add(got[0])
            if len(pids) == workers:
                break
            if self.master.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not serve with {workers} workers ({pids})")
            time.sleep(0.2)
        per = 4
        self.clients = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, str(self.port), str(n), str(nice)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,
                text=True,
            )
            for n in [per] * (clients // per) + ([clients % per] if clients % per else [])
        ]
        procs += self.clients
        for c in self.clients:
            assert c.stdout is not None
            assert c.stdout.readline().strip() == "ready"

    def _get(self) -> tuple[int, int, int] | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            pid, seen, t, _, _ = conn.getresponse().read().split()
            return int(pid), int(seen), int(t)
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            conn.close()

    def picks(self) -> list[list[tuple[int, int, int, int]]]:
        """Per worker, in time order: (highest port seen, time_ns after the pick, time_ns
        before it, its CPU ns) of every answer."""
        for c in self.clients:
            text, _ = c.communicate(timeout=60)
            for line in text.split("\n"):
                pid, seen, t, before, cpu = line.split()
                self.answers.append((int(pid), int(seen), int(t), int(before), int(cpu)))
        per: dict[int, list[tuple[int, int, int, int]]] = {}
        for pid, seen, t, before, cpu in self.answers:
            per.setdefault(pid, []).append((seen, t, before, cpu))
        if len(per) != self.workers:
            raise AssertionError(f"{len(per)} gunicorn workers answered, {self.workers} run")
        return [sorted(rows, key=lambda r: r[1]) for rows in per.values()]

    def gaps_ms(self) -> float:
        """Median time between two consecutive requests served by one worker."""
        by_pid: dict[int, list[int]] = {}
        for pid, _, t, _, _ in self.answers:
            by_pid.setdefault(pid, []).append(t)
        gaps = [
            (b - a) / 1e6
            for ts in by_pid.values()
            for a, b in zip(sorted(ts), sorted(ts)[1:], strict=False)
        ]
        return statistics.median(gaps) if gaps else float("nan")


def _niced(argv: list[str], nice: int) -> list[str]:
    """``argv`` run at nice level ``nice`` (coreutils nice(1): the pid stays the command's)."""
    return ["nice", "-n", str(nice), *argv] if nice else argv


def _populate(reg: registry_pb2_grpc.RegistryStub, services: int, nodes: int) -> None:
    """Register ``services`` services of ``nodes`` nodes (8 threads of Register calls)."""

    def one(s: int) -> None:
        for k in range(nodes):
            reg.Register(
                registry_pb2.RegisterRequest(
                    service=f"svc-{s:05d}",
                    host=f"10.{s // 250}.{s % 250}.{k + 1}",
                    port=8080,
                    ttl_seconds=0,
                ),
                timeout=30,
            )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(services)))


def _mode(region: Path) -> str:
    """How the region's sidecar follows the server once it has a map ("" before)."""
    try:
        meta = RegionReader(region).meta()
    except (ClusterMapError, OSError):
        return ""
    return meta.mode if meta.revision and not meta.stale else ""


#: The stages of a change, in order, as marked by clustermap/trace.py (watch; a polling sidecar
#: marks only the last three), then the first pick of each worker that sees it.
STAGES: Final = (
    "server.commit",  # the registry applies the change and notifies (origin of every figure)
    "server.follower",  # the Watch follower thread wakes
    "server.encoded",  # it has made the delta answer (registry call + encoding)
    "server.loop",  # the event loop runs the hand-over (call_soon_threadsafe)
    "server.write",  # the stream's coroutine starts context.write
    "server.written",  # ... and it returns
    "sidecar.received",  # the sidecar's stream thread has the message
    "sidecar.decoded",  # ... decoded and validated
    "sidecar.dequeued",  # the main loop takes it from the queue
    "sidecar.merged",  # mirror applied, checksum verified
    "sidecar.decided",  # protection decided
    "sidecar.published",  # in the region: the next pick in any worker sees it
)


def _first_at_or_after(rows: list[tuple[int, int]], revision: int) -> int | None:
    """The first time (rows sorted by time) at which a revision >= ``revision`` was seen."""
    return next((t for r, t in rows if r >= revision), None)


def _read_trace(path: Path) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """(stage, pid) -> [(revision, time_ns)] in time order."""
    marks: dict[tuple[str, int], list[tuple[int, int]]] = {}
    if not path.exists():
        return marks
    for line in path.read_text().splitlines():
        stage, rev, t, pid = line.split()
        marks.setdefault((stage, int(pid)), []).append((int(rev), int(t)))
    for rows in marks.values():
        rows.sort(key=lambda r: r[1])
    return marks


def _q(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return {"p50": v, "p90": v, "p99": v, "max": v}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98], "max": values[-1]}


def _fmt(q: dict[str, float]) -> str:
    return f"p50 {q['p50']:.2f}  p90 {q['p90']:.2f}  p99 {q['p99']:.2f}  max {q['max']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("processes", "gunicorn"), default="processes")
    ap.add_argument("--changes", type=int, default=60)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--workers", type=int, help="default 4 processes or 8 gunicorn workers")
    ap.add_argument(
        "--clients", type=int, default=8, help="HTTP client threads, 4 per process (gunicorn)"
    )
    ap.add_argument(
        "--client-nice",
        type=int,
        default=19,
        help="nice level of the HTTP client processes (gunicorn; default 19: they stand in "
        "for clients on other machines and get the CPU only when the product does not need "
        "it; 0 makes them compete)",
    )
    ap.add_argument(
        "--product-nice",
        type=int,
        default=0,
        help="nice level of cm-server, cm-sidecar and the workers (default 0; below 0 needs "
        "root: on a machine shared with other work it puts the product ahead of that work, "
        "as on a machine of its own; give the clients a level between it and 19)",
    )
    ap.add_argument(
        "--subscribe",
        choices=("poll", "watch", "both"),
        default="poll",
        help="how the sidecar follows the server; both: two sidecars side by side",
    )
    ap.add_argument(
        "--no-trace",
        action="store_true",
        help="run cm-server and cm-sidecar without $CLUSTERMAP_TRACE (no stage figures; "
        "latencies then start before the Register call instead of at the registry's commit)",
    )
    ap.add_argument(
        "--services",
        type=int,
        default=0,
        metavar="N",
        help="N other services of --nodes nodes each in the map, unchanged while the changes "
        "go on (shows what a one-node change costs as the map grows)",
    )
    ap.add_argument("--nodes", type=int, default=10, help="nodes per other service (--services)")
    ap.add_argument("--json", help="also write the figures (and every latency) to this file")
    ap.add_argument(
        "--etcd-replicas",
        type=int,
        default=0,
        metavar="N",
        help="N cm-server replicas on a 3-member etcd (needs the etcd binary): changes are made "
        "through the first replica, the sidecar polls the second",
    )
    args = ap.parse_args()
    workers = args.workers or (8 if args.mode == "gunicorn" else 4)
    tmp = Path(tempfile.mkdtemp(prefix="cm-bench-", dir="/dev/shm"))
    subscribes = ("poll", "watch") if args.subscribe == "both" else (args.subscribe,)
    bin_ = Path(sys.executable).parent
    trace_file = tmp / "trace"
    env = dict(os.environ)
    env.pop(trace.ENV, None)
    if not args.no_trace:
        env[trace.ENV] = str(trace_file)
    procs: list[subprocess.Popen[str]] = []
    etcd = None
    try:
        store: list[str] = []
        if args.etcd_replicas:
            sys.path.insert(0, str(HERE.parent))
            from tests.integration.etcd.harness import start_cluster

            etcd = start_cluster(3)
            store = ["--store", etcd.url("bench-propagation")]
        addresses = [f"127.0.0.1:{free_port()}" for _ in range(max(args.etcd_replicas, 1))]
        for a in addresses:
            procs.append(
                subprocess.Popen(
                    _niced(
                        [str(bin_ / "cm-server"), "--listen", a, "--warmup", "0.1", *store],
                        args.product_nice,
                    ),
                    env=env,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    text=True,
                )
            )
        address = addresses[0]  # changes go here; the sidecar polls the last replica
        polled = addresses[-1]
        for a in addresses[1:]:
            with grpc.insecure_channel(a) as other:
                grpc.channel_ready_future(other).result(timeout=15)
        channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(channel).result(timeout=15)
        reg = registry_pb2_grpc.RegistryStub(channel)

        def register(port: int) -> int:
            for _ in range(100):
                try:
                    return int(
                        reg.Register(
                            registry_pb2.RegisterRequest(
                                service="prop", host="127.0.0.1", port=port, ttl_seconds=0
                            ),
                            timeout=2,
                        ).revision
                    )
                except grpc.RpcError:
                    time.sleep(0.05)
            raise RuntimeError("cm-server did not accept a registration")

        register(1)
        if args.services:
            t = time.monotonic()
            _populate(reg, args.services, args.nodes)
            print(
                f"{args.services} other services x {args.nodes} nodes registered in "
                f"{time.monotonic() - t:.0f} s",
                flush=True,
            )
        fleets: dict[str, Processes | Gunicorn] = {}
        sidecars: dict[str, int] = {}
        for how in subscribes:
            region = tmp / f"{how}.region"
            sidecar = subprocess.Popen(
                _niced(
                    [
                        str(bin_ / "cm-sidecar"),
                        "--server",
                        polled,
                        "--region",
                        str(region),
                        "--interval",
                        str(args.interval),
                        *(["--watch"] if how == "watch" else []),
                    ],
                    args.product_nice,
                ),
                env=env,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                text=True,
            )
            procs.append(sidecar)
            sidecars[how] = sidecar.pid
            while _mode(region) != how:  # synced, and (watch) the stream is up
                time.sleep(0.05)
            if args.mode == "gunicorn":
                fleets[how] = Gunicorn(
                    region, workers, args.clients, args.client_nice, args.product_nice, procs
                )
            else:
                fleets[how] = Processes(region, workers, args.product_nice, procs)
        time.sleep(1.0)
        sent: dict[int, tuple[int, int]] = {}  # port registered: (time_ns before the call, rev)
        for i in range(args.changes):
            time.sleep(random.uniform(0.1, 2 * args.interval))
            t0 = time.time_ns()
            sent[2 + i] = (t0, register(2 + i))
        time.sleep(args.interval + 1.0)
        print(f"machine: {machine()}")
        where = (
            f"{len(addresses)} replicas on a 3-member etcd, change via one, sidecar on another; "
            if args.etcd_replicas
            else ""
        )
        marks = _read_trace(trace_file)
        servers = {p.pid for p in procs[: len(addresses)]}
        commits = {
            port: _first_at_or_after(
                sorted(
                    (
                        row
                        for (stage, pid), rows in marks.items()
                        if stage == "server.commit"
                        for row in rows
                    ),
                    key=lambda r: r[1],
                ),
                rev,
            )
            for port, (_, rev) in sent.items()
        }
        traced = all(t is not None for t in commits.values()) and not args.no_trace
        origin = "the registry's commit" if traced else "the Register call"
        results: dict[str, object] = {}
        for how, fleet in fleets.items():
            latencies: list[float] = []
            waits: list[float] = []  # after the publish, until the worker's first pick
            late: list[float] = []  # picks after the publish that missed it (should be none)
            stages: dict[str, list[float]] = {name: [] for name in STAGES[1:]}
            to_region: list[float] = []
            first_picks: list[float] = []  # how long the first pick that sees it takes
            first_cpu: list[float] = []  # ... in CPU time
            picks = fleet.picks()
            for port, (t_call, rev) in sent.items():
                t_commit = commits[port] if traced else None
                t0 = t_commit if t_commit is not None else t_call
                t_pub = None
                if traced:
                    prev = t0
                    for name in STAGES[1:]:
                        if how == "poll" and name.startswith("server."):
                            continue  # the stream's stages (a polling twin's are not marked)
                        pids = servers if name.startswith("server.") else {sidecars[how]}
                        ts = [
                            t
                            for pid in pids
                            if (t := _first_at_or_after(marks.get((name, pid), []), rev))
                            is not None
                        ]
                        if not ts:
                            continue  # not a stage of this mode (polling)
                        t = min(ts)
                        stages[name].append((t - prev) / 1e6)
                        prev = t
                    t_pub = prev
                    to_region.append((t_pub - t0) / 1e6)
                for rows in picks:
                    t, b, cpu = next(
                        ((t, b, c) for p, t, b, c in rows if p >= port), (None, None, None)
                    )
                    if t is None or b is None or cpu is None:
                        raise AssertionError(f"a worker never saw the change of port {port}")
                    latencies.append((t - t0) / 1e6)
                    if t != b:
                        first_picks.append((t - b) / 1e6)
                        first_cpu.append(cpu / 1e6)
                    if t_pub is not None:
                        waits.append((t - t_pub) / 1e6)
                        missed = [b for p, _, b, _ in rows if p < port and b > t_pub]
                        if missed:
                            late.append((missed[-1] - t_pub) / 1e6)
            q = _q(latencies)
            gap = fleet.gaps_ms()
            bar = args.interval * 1e3 + 100 if how == "poll" else 20.0
            print(
                f"{where}{args.mode}, {how} (interval {args.interval * 1e3:.0f} ms), "
                f"{workers} workers, {len(latencies)} observations of {len(sent)} changes, "
                f"from {origin} to the first pick that sees it: "
                f"p50 {q['p50']:.1f} ms, p90 {q['p90']:.1f} ms, p99 {q['p99']:.1f} ms, "
                f"max {q['max']:.1f} ms (bar p99 <= {bar:.0f} ms); "
                f"a worker picks every {gap:.1f} ms (median)"
            )
            row: dict[str, object] = {
                "mode": args.mode,
                "subscribe": how,
                "etcd_replicas": args.etcd_replicas,
                "workers": workers,
                "client_nice": args.client_nice if args.mode == "gunicorn" else None,
                "product_nice": args.product_nice,
                "interval_ms": args.interval * 1e3,
                "changes": len(sent),
                "origin": origin,
                "p50_ms": q["p50"],
                "p90_ms": q["p90"],
                "p99_ms": q["p99"],
                "max_ms": q["max"],
                "bar_ms": bar,
                "worker_gap_ms": gap,
                "latencies_ms": sorted(latencies),
            }
            if traced:
                print(f"  stage (ms since the previous one, per change; {len(sent)} changes)")
                for name, values in stages.items():
                    if values:
                        print(f"  {name:<20} {_fmt(_q(values))}")
                print(f"  {'= commit -> region':<20} {_fmt(_q(to_region))}")
                print(
                    f"  {'+ next pick':<20} {_fmt(_q(waits))}   "
                    f"({len(waits)} (change, worker) pairs: from the publish to the first pick "
                    "that sees it, i.e. the wait for a request plus the pick)"
                )
                if first_picks:
                    print(
                        f"  {'(that pick itself)':<20} {_fmt(_q(first_picks))}   (re-read, decode "
                        "and a new picker, in the worker)"
                    )
                    print(f"  {'(... its CPU time)':<20} {_fmt(_q(first_cpu))}")
                    row["first_pick_ms"] = _q(first_picks)
                    row["first_pick_cpu_ms"] = _q(first_cpu)
                if late:
                    print(f"  !! {len(late)} picks after the publish missed it: {_fmt(_q(late))}")
                row["stages_ms"] = {n: _q(v) for n, v in stages.items() if v}
                row["to_region_ms"] = _q(to_region)
                row["publish_to_pick_ms"] = _q(waits)
                row["late_picks"] = len(late)
                calls = [
                    (c - t) / 1e6
                    for (t, _), c in zip(sent.values(), commits.values(), strict=True)
                    if c
                ]
                row["call_to_commit_ms"] = _q(calls)
                print(f"  (the Register call -> commit: {_fmt(_q(calls))})")
            results[how] = row
        write_json(args.json, results[subscribes[0]] if len(results) == 1 else results)  # type: ignore[arg-type]
        channel.close()
    finally:
        for p in reversed(procs):
            _stop(p)
        if etcd is not None:
            etcd.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
