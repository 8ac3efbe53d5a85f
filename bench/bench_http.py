"""clustermap.http: what a request through the map costs, and what it saves when a backend dies.

    uv run python bench/bench_http.py [--quick] [--json PATH]

* **overhead**: ``clustermap.http.Session().get("http://bench-svc/")`` against a plain
  ``requests.Session().get("http://127.0.0.1:PORT/")`` to the same local backend (HTTP/1.1
  keep-alive, a separate process), and the same for ``httpx.Client`` with and without
  ``transport=clustermap.http.Transport()``. Each figure is the fastest of many short runs (50
  requests), the two sides alternating, reported as a ratio measured in one run.
* **crash**: 4 worker processes call a 3-node service in a loop; one backend is SIGKILLed (and
  stays registered). Failed requests seen by the callers with ``clustermap.http.Session`` (a
  retry on another node, machine-wide ejection)
  against a per-process client (round-robin over the same nodes, no retry, each process ejecting a
  node after 5 consecutive failures of its own, like an in-process SDK), side by side.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_json

ROOT = Path(__file__).resolve().parents[1]

BACKEND = """
import socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def setup(self):
        super().setup()  # no Nagle: headers and body leave at once, no delayed-ACK stall
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
s.daemon_threads = True
print(s.server_address[1], flush=True)
s.serve_forever()
"""

WORKER = """
import sys, time, requests, clustermap, clustermap.http
region, mode, duration, *addresses = sys.argv[1:]
stop = time.monotonic() + float(duration)
failed = 0
calls = 0
if mode == "clustermap":
    s = clustermap.http.Session(clustermap.open(region))
    def get():
        return s.get("http://crash-svc/", timeout=2)
else:  # per process: round-robin, no retry, eject after 5 consecutive failures of its own
    s = requests.Session()
    streak = {a: 0 for a in addresses}
    out_until = {a: 0.0 for a in addresses}
    i = 0
    def get():
        global i
        for _ in range(len(addresses)):
            a = addresses[i % len(addresses)]
            i += 1
            if out_until[a] <= time.monotonic():
                break
        try:
            r = s.get(f"http://{a}/", timeout=2)
        except requests.RequestException:
            streak[a] += 1
            if streak[a] >= 5:
                out_until[a] = time.monotonic() + 30
            raise
        streak[a] = 0
        return r
print("ready", flush=True)
sys.stdin.readline()
while time.monotonic() < stop:
    calls += 1
    try:
        get()
    except (requests.RequestException, clustermap.ClusterMapError):
        failed += 1
    time.sleep(0.005)  # a request's worth of other work
print(calls, failed, flush=True)
"""


class Backend:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BACKEND], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.address = f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class Stack:
    def __init__(self, tmp: Path, services: dict[str, list[str]]) -> None:
        sys.path.insert(0, str(ROOT))
        from tests.support.stack import ServerProc, SidecarProc

        self.region = tmp / "h.region"
        self.server = ServerProc()
        for name, addresses in services.items():
            for a in addresses:
                host, port = a.rsplit(":", 1)
                self.server.register(name, host, int(port))
        self.sidecar = SidecarProc(self.region, [self.server.address], interval=0.5)
        self.sidecar.wait_synced()
        deadline = time.monotonic() + 10
        while not Path(str(self.region) + ".load").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.sidecar.close()
        self.server.close()


def per_request_us(get: object, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        get()  # type: ignore[operator]
    return (time.perf_counter() - t0) / number * 1e6


def overhead(region: Path, address: str, number: int, repeat: int) -> dict[str, float]:
    import httpx
    import requests

    import clustermap
    import clustermap.http

    cm = clustermap.open(region)
    plain, mapped = requests.Session(), clustermap.http.Session(cm)
    hplain = httpx.Client()
    hmapped = httpx.Client(transport=clustermap.http.Transport(cm))
    cases = {
        "requests": (
            lambda: plain.get(f"http://{address}/"),
            lambda: mapped.get("http://bench-svc/"),
        ),
        "httpx": (
            lambda: hplain.get(f"http://{address}/"),
            lambda: hmapped.get("http://bench-svc/"),
        ),
    }
    out: dict[str, float] = {}
    for name, (base, through) in cases.items():
        base(), through()  # warm: connections open, map and feedback row ready
        b, t = [], []
        for _ in range(repeat):  # short alternating runs: both sides see the same load
            b.append(per_request_us(base, number))
            t.append(per_request_us(through, number))
        out[f"{name}_plain_us"] = min(b)
        out[f"{name}_clustermap_us"] = min(t)
        out[f"{name}_ratio"] = min(t) / min(b)
    return out


def crash(tmp: Path, duration: float, workers: int) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for mode in ("clustermap", "per-process"):
        backends = [Backend() for _ in range(3)]
        addresses = [b.address for b in backends]
        stack = Stack(tmp / mode, {"crash-svc": addresses})
        try:
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        WORKER,
                        str(stack.region),
                        mode,
                        str(duration),
                        *addresses,
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                )
                for _ in range(workers)
            ]
            for p in procs:
                assert p.stdout is not None
                assert p.stdout.readline().strip() == "ready"
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            time.sleep(duration / 4)  # the bench's schedule: the crash a quarter of the way in
            backends[0].kill()
            calls = failed = 0
            for p in procs:
                assert p.stdout is not None
                c, f = p.stdout.readline().split()
                calls, failed = calls + int(c), failed + int(f)
                p.wait()
            out[mode] = {"calls": calls, "failed": failed}
        finally:
            stack.close()
            for b in backends:
                if b.proc.poll() is None:
                    b.kill()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    results: dict[str, object] = {}
    tmp = Path(tempfile.mkdtemp(prefix="cm-bench-", dir="/dev/shm"))
    backend = Backend()
    try:
        stack = Stack(tmp, {"bench-svc": [backend.address]})
        try:
            o = overhead(
                stack.region, backend.address, 200 if args.quick else 500, 3 if args.quick else 5
            )
        finally:
            stack.close()
        for lib in ("requests", "httpx"):
            print(
                f"{lib:9} plain {o[f'{lib}_plain_us']:7.0f} us/request   through the map "
                f"{o[f'{lib}_clustermap_us']:7.0f} us/request   ratio {o[f'{lib}_ratio']:.2f}"
            )
        results["overhead"] = o
        c = crash(tmp, 4.0 if args.quick else 8.0, 4)
        for mode, r in c.items():
            print(f"backend SIGKILLed, {mode:12} calls {r['calls']:6}  failed {r['failed']:5}")
        results["crash"] = c
    finally:
        backend.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
