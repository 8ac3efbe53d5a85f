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
import threading
import time
from pathlib import Path

import grpc
from common import free_port, machine, write_json

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

    def __init__(self, region: Path, workers: int, procs: list[subprocess.Popen[str]]) -> None:
        self.workers = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(region)],
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

    def sightings(self) -> list[list[tuple[int, int]]]:
        """Per worker: (highest port seen, time_ns) each time it changed."""
        out = []
        for w in self.workers:
            w.terminate()
            text, _ = w.communicate()
            out.append(
                sorted((int(p), int(t)) for p, t in (ln.split() for ln in text.split("\n") if ln))
            )
        return out

    def gaps_ms(self) -> float:
        return 1.0


class Gunicorn:
    """gunicorn sync workers serving bench/prop_app.py, kept busy by loopback HTTP clients."""

    def __init__(
        self, region: Path, workers: int, clients: int, procs: list[subprocess.Popen[str]]
    ) -> None:
        self.port = free_port()
        env = dict(os.environ, CLUSTERMAP_REGION=str(region))
        self.master = subprocess.Popen(
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
            env=env,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        procs.append(self.master)
        self.workers = workers
        self.answers: list[tuple[int, int, int]] = []  # (pid, highest port seen, time_ns)
        self.stop = threading.Event()
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
        self.threads = [threading.Thread(target=self._load, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _get(self) -> tuple[int, int, int] | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            pid, seen, t = conn.getresponse().read().split()
            return int(pid), int(seen), int(t)
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            conn.close()

    def _load(self) -> None:
        while not self.stop.is_set():
            got = self._get()
            if got:
                self.answers.append(got)
            time.sleep(0.002)

    def sightings(self) -> list[list[tuple[int, int]]]:
        self.stop.set()
        for t in self.threads:
            t.join(10)
        per: dict[int, list[tuple[int, int]]] = {}
        for pid, seen, t in self.answers:
            per.setdefault(pid, []).append((seen, t))
        for pid, rows in per.items():
            rows.sort(key=lambda r: r[1])
            # keep the first answer at each new high: (highest port seen, first time seen)
            firsts, top = [], -1
            for seen, t in rows:
                if seen > top:
                    firsts.append((seen, t))
                    top = seen
            per[pid] = firsts
        if len(per) != self.workers:
            raise AssertionError(f"{len(per)} gunicorn workers answered, {self.workers} run")
        return list(per.values())

    def gaps_ms(self) -> float:
        """Median time between two consecutive requests served by one worker."""
        by_pid: dict[int, list[int]] = {}
        for pid, _, t in self.answers:
            by_pid.setdefault(pid, []).append(t)
        gaps = [
            (b - a) / 1e6
            for ts in by_pid.values()
            for a, b in zip(sorted(ts), sorted(ts)[1:], strict=False)
        ]
        return statistics.median(gaps) if gaps else float("nan")


def _mode(region: Path) -> str:
    """How the region's sidecar follows the server once it has a map ("" before)."""
    try:
        meta = RegionReader(region).meta()
    except (ClusterMapError, OSError):
        return ""
    return meta.mode if meta.revision and not meta.stale else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("processes", "gunicorn"), default="processes")
    ap.add_argument("--changes", type=int, default=60)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--workers", type=int, help="default 4 processes or 8 gunicorn workers")
    ap.add_argument("--clients", type=int, default=8, help="HTTP client threads (gunicorn)")
    ap.add_argument(
        "--subscribe",
        choices=("poll", "watch", "both"),
        default="poll",
        help="how the sidecar follows the server; both: two sidecars side by side",
    )
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
                    [str(bin_ / "cm-server"), "--listen", a, "--warmup", "0.1", *store],
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

        def register(port: int) -> None:
            for _ in range(100):
                try:
                    reg.Register(
                        registry_pb2.RegisterRequest(
                            service="prop", host="127.0.0.1", port=port, ttl_seconds=0
                        ),
                        timeout=2,
                    )
                    return
                except grpc.RpcError:
                    time.sleep(0.05)
            raise RuntimeError("cm-server did not accept a registration")

        register(1)
        fleets: dict[str, Processes | Gunicorn] = {}
        for how in subscribes:
            region = tmp / f"{how}.region"
            procs.append(
                subprocess.Popen(
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
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    text=True,
                )
            )
            while _mode(region) != how:  # synced, and (watch) the stream is up
                time.sleep(0.05)
            if args.mode == "gunicorn":
                fleets[how] = Gunicorn(region, workers, args.clients, procs)
            else:
                fleets[how] = Processes(region, workers, procs)
        time.sleep(1.0)
        sent: dict[int, int] = {}  # port registered: time_ns the change was made
        for i in range(args.changes):
            time.sleep(random.uniform(0.1, 2 * args.interval))
            t0 = time.time_ns()
            register(2 + i)
            sent[2 + i] = t0
        time.sleep(args.interval + 1.0)
        print(f"machine: {machine()}")
        where = (
            f"{len(addresses)} replicas on a 3-member etcd, change via one, sidecar on another; "
            if args.etcd_replicas
            else ""
        )
        results = {}
        for how, fleet in fleets.items():
            latencies: list[float] = []
            for seen in fleet.sightings():
                for port, t0 in sent.items():
                    t = next((t for p, t in seen if p >= port), None)
                    if t is None:
                        raise AssertionError(f"a worker never saw the change of port {port}")
                    latencies.append((t - t0) / 1e6)
            latencies.sort()
            q = statistics.quantiles(latencies, n=100)
            gap = fleet.gaps_ms()
            bar = args.interval * 1e3 + 100 if how == "poll" else 20.0
            print(
                f"{where}{args.mode}, {how} (interval {args.interval * 1e3:.0f} ms), "
                f"{workers} workers, {len(latencies)} observations of {len(sent)} changes: "
                f"p50 {q[49]:.0f} ms, p90 {q[89]:.0f} ms, p99 {q[98]:.0f} ms, "
                f"max {latencies[-1]:.0f} ms (bar p99 <= {bar:.0f} ms); "
                f"a worker looks every {gap:.1f} ms (median)"
            )
            results[how] = {
                "mode": args.mode,
                "subscribe": how,
                "etcd_replicas": args.etcd_replicas,
                "workers": workers,
                "interval_ms": args.interval * 1e3,
                "changes": len(sent),
                "p50_ms": q[49],
                "p90_ms": q[89],
                "p99_ms": q[98],
                "max_ms": latencies[-1],
                "bar_ms": bar,
                "worker_gap_ms": gap,
                "latencies_ms": latencies,
            }
        write_json(args.json, results[subscribes[0]] if len(results) == 1 else results)
        channel.close()
    finally:
        for p in reversed(procs):
            _stop(p)
        if etcd is not None:
            etcd.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
