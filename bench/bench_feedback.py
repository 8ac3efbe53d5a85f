"""Caller feedback: what it costs a worker, how fast a failing node leaves every worker, and how
that compares with per-process ejection (what an in-process SDK does).

    uv run python bench/bench_feedback.py [--quick] [--json PATH] [--skip-instructions]

* **cost**: CPU instructions per call (valgrind's callgrind, the difference between two loop
  lengths, so start-up cancels out) of a bare function call, ``pick()`` round-robin,
  ``pick(strategy="least_request")`` and ``with call()`` around a pick, as ratios to the bare call.
  Instruction counts do not move with the load other processes put on the machine, unlike
  nanoseconds (bench_pick.py gives those, measured in alternation with the same baseline).
* **speed**: a real cm-server and cm-sidecar, 8 worker processes picking in a loop; a 9th process
  reports 5 failures of one node. Time from the 5th failure until the last worker stops picking
  that node, over several trials.
* **comparison**: 8 workers serving requests round-robin over 3 nodes of which one fails every
  call. With ClusterMap the failures of all workers add up; with per-process ejection each
  worker must see 5 failures of its own. Failed requests over time, both ways, in one figure
  (``docs/img/feedback_ejection.png`` via bench/plots.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_json

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SETUP = """
import tempfile, clustermap
from pathlib import Path
from clustermap.model import Node, Service
from clustermap.region.writer import RegionWriter
from clustermap.sidecar.feedback import FeedbackHub
from clustermap.sidecar.outlier import OutlierPolicy
tmp = Path(tempfile.mkdtemp(dir="/dev/shm"))
hub = FeedbackHub(str(tmp / "r.region"), rows=8, entries=64, capacity=1024, mode=0o660,
                  group=None, policy=OutlierPolicy())
nodes = tuple(Node(f"10.0.0.{i}", 8080) for i in range(16))
with RegionWriter(tmp / "r.region") as w:
    w.publish([hub.decorate(Service("rr", nodes))])
cm = clustermap.open(tmp / "r.region")
pick, call = cm.pick, cm.call
def bare(service, key=None, strategy=None):
    return None
with call("rr"):
    pass
pick("rr", strategy="least_request")
"""

CASES = [
    ("bare call (baseline)", "bare('rr')", None),
    ("pick(), round_robin", "pick('rr')", 4),
    ("pick(strategy='least_request')", "pick('rr', strategy='least_request')", 10),
    ("with call(): pick, count in flight, record", "with call('rr'):\n        pass", 15),
    ("  the with statement and object alone", "with nothing():\n        pass", None),
]

NOTHING = """
class _Nothing:
    __slots__ = ("node", "_words", "_i", "_failed")
    def __enter__(self):
        return self.node
    def __exit__(self, t, v, tb):
        return None
_new = object.__new__
def nothing():
    c = _new(_Nothing)
    c.node = None
    c._failed = None
    return c
"""


def instructions(stmt: str, loops: int) -> int:
    code = SETUP + NOTHING + f"for _ in range({loops}):\n    {stmt}\n"
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        check=True,
    ).stderr
    found = re.search(r"Collected : (\d+)", out)
    assert found, out[-2000:]
    return int(found.group(1))


def cost(quick: bool) -> list[dict[str, object]]:
    n1, n2 = (2000, 6000) if quick else (5000, 25000)
    rows = []
    base = 0.0
    for label, stmt, bar in CASES:
        per = (instructions(stmt, n2) - instructions(stmt, n1)) / (n2 - n1)
        if not base:
            base = per
        ratio = per / base
        rows.append({"label": label, "instructions": per, "x_bare": ratio, "bar": bar})
        print(f"  {label:44} {per:9.0f} instr  {ratio:6.2f} x bare  {f'{bar}x' if bar else ''}")
    return rows


def sweep_cost(active: int, changing: int) -> dict[str, float]:
    """The sidecar's CPU per sweep: 256 rows of 64 entries, ``active`` of them held by a live
    process, ``changing`` of those with new counts in every sweep (10 nodes each)."""
    import struct

    from clustermap.feedback import layout as L
    from clustermap.feedback.ofd import try_lock
    from clustermap.model import Node, Service
    from clustermap.sidecar.feedback import FeedbackHub
    from clustermap.sidecar.outlier import OutlierPolicy

    tmp = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        hub = FeedbackHub(
            str(tmp / "r.region"),
            rows=256,
            entries=64,
            capacity=65536,
            mode=0o660,
            group=None,
            policy=OutlierPolicy(),
        )
        hub.decorate(Service("api", tuple(Node("10.0.0.1", 1000 + i) for i in range(100))))
        fd = os.open(hub.rows_path, os.O_RDWR)
        size = hub.header.row_size
        for r in range(active):
            assert try_lock(fd, L.HEADER_SIZE + r * size, size)

        def write(r: int, k: int) -> None:
            data = struct.pack("<8Q", 1 << 32 | r, *[0] * 7)
            for node in range(10):
                data += struct.pack("<QddQQ", node + 1, float(k << L.OK_SHIFT | 1), k / 1e3, 0, 0)
            os.pwrite(fd, data, L.HEADER_SIZE + r * size)

        for r in range(active):
            write(r, 0)
        hub.sweep()
        runs = []
        for k in range(1, 201):
            for r in range(changing):
                write(r, k)
            t0 = time.perf_counter()
            hub.sweep()
            runs.append(time.perf_counter() - t0)
        os.close(fd)
        hub.close()
        return {"median_ms": statistics.median(runs) * 1e3, "p99_ms": sorted(runs)[197] * 1e3}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- real processes ---------------------------------------------------------------------------

PICKER = """
import sys, time, clustermap
cm = clustermap.open(sys.argv[1])
target, stop_at = sys.argv[2], int(sys.argv[3])
while cm.pick("api").address != target:
    pass
last = time.monotonic_ns()
print("ready", flush=True)
while time.monotonic_ns() < stop_at:
    if cm.pick("api").address == target:
        last = time.monotonic_ns()
print(last, flush=True)
"""

# One worker serving requests: pick a node, "call" it (the bad one fails), per-process
# ejection optional. Prints one line per failed request: its monotonic time in ns.
SERVER = """
import sys, time, clustermap
cm = clustermap.open(sys.argv[1])
bad, local, duration = sys.argv[2], sys.argv[3] == "local", float(sys.argv[4])
streak, ejected = 0, False
start = time.monotonic()
print("ready", flush=True)
while time.monotonic() - start < duration:
    if local:
        node = cm.pick("cmp")
        if ejected and node.address == bad:
            continue
        if node.address == bad:
            streak += 1
            ejected = streak >= 5
            print(time.monotonic_ns(), flush=True)
    else:
        try:
            with cm.call("cmp") as node:
                if node.address == bad:
                    print(time.monotonic_ns(), flush=True)
                    raise ConnectionError
        except ConnectionError:
            pass
    time.sleep(0.01)  # a request's worth of work
"""


class Stack:
    def __init__(self, tmp: Path) -> None:
        sys.path.insert(0, str(ROOT))
        from tests.support.stack import ServerProc, SidecarProc

        self.region = tmp / "b.region"
        self.server = ServerProc()
        for port in range(18201, 18213):  # one node per trial
            self.server.register("api", "127.0.0.1", port)
        for port in (18301, 18302, 18303):
            self.server.register("cmp", "127.0.0.1", port)
        # Every trial ejects a node of its own, for longer than the bench runs.
        os.environ["CLUSTERMAP_OUTLIER_MAX_EJECTION_PERCENT"] = "100"
        self.sidecar = SidecarProc(self.region, [self.server.address], interval=0.5)
        self.sidecar.wait_synced()
        deadline = time.monotonic() + 10
        while not Path(str(self.region) + ".load").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.sidecar.close()
        self.server.close()


def run_all(script: str, args: list[list[str]]) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *a], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        for a in args
    ]
    return procs


def speed(stack: Stack, trials: int) -> list[float]:
    import clustermap

    cm = clustermap.open(stack.region)
    out = []
    for trial in range(trials):
        bad = f"127.0.0.1:{18201 + trial}"
        node = next(n for n in cm.service("api").nodes if n.address == bad)
        stop_at = time.monotonic_ns() + 4_000_000_000
        pickers = run_all(PICKER, [[str(stack.region), bad, str(stop_at)] for _ in range(8)])
        for p in pickers:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        for _ in range(4):
            cm.report("api", node, ok=False)
        time.sleep(0.1)
        cm.report("api", node, ok=False)
        fifth = time.monotonic_ns()
        last = []
        for p in pickers:
            assert p.stdout is not None
            last.append(int(p.stdout.readline()))
            p.wait()
        out.append(max(0.0, (max(last) - fifth) / 1e6))
    return out


def comparison(stack: Stack, duration: float) -> dict[str, list[float]]:
    result: dict[str, list[float]] = {}
    for mode, bad in (("shared", "127.0.0.1:18302"), ("local", "127.0.0.1:18303")):
        procs = run_all(SERVER, [[str(stack.region), bad, mode, str(duration)] for _ in range(8)])
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        start = time.monotonic_ns()
        times = []
        for p in procs:
            assert p.stdout is not None
            times += [(int(x) - start) / 1e6 for x in p.stdout.read().split()]
            p.wait()
        result[mode] = sorted(times)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-instructions", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--sweep-only", action="store_true", help="only the sidecar's sweep cost")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    results: dict[str, object] = {}
    print("sidecar sweep (256 rows of 64 entries; active rows / rows changing every sweep):")
    sweeps = []
    for active, changing in ((0, 0), (32, 0), (32, 32), (128, 128)):
        figures = sweep_cost(active, changing)
        sweeps.append({"active": active, "changing": changing, **figures})
        print(
            f"  {active:4} / {changing:4}: median {figures['median_ms']:.2f} ms, "
            f"p99 {figures['p99_ms']:.2f} ms"
        )
    results["sweep"] = sweeps
    if args.sweep_only:
        write_json(args.json, results)
        return
    if not args.skip_instructions and shutil.which("valgrind"):
        print("cost per call (callgrind instructions):")
        results["cost"] = cost(args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="cm-bench-", dir="/dev/shm"))
    stack = Stack(tmp)
    try:
        trials = speed(stack, 3 if args.quick else 10)
        print(
            f"5th failure -> no worker picks the node: median {statistics.median(trials):.0f} ms, "
            f"max {max(trials):.0f} ms over {len(trials)} trials (bar 150 ms)"
        )
        results["speed_ms"] = trials
        cmp = comparison(stack, 1.5)
        for mode, label in (("shared", "ClusterMap (machine-wide)"), ("local", "per process")):
            times = cmp[mode]
            last = f"{times[-1]:.0f} ms" if times else "-"
            print(f"{label:28} failed requests {len(times):4}  last failure at {last}")
            print("   ", " ".join(f"{t:.0f}" for t in times))
        results["comparison"] = cmp
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
