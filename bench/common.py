"""Shared bench helpers: medians of repeated runs, the bare-call baseline every ratio uses,
percentiles, a process's CPU time and the machine it ran on."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from clustermap.model import Node, Service


def per_call_ns(fn: Callable[[], object], number: int = 200_000, repeat: int = 7) -> float:
    """ns per call of ``fn``: the fastest of ``repeat`` runs of ``number`` calls (loop included).
    The minimum is the run least disturbed by other load, so ratios between two such figures
    measured in one run are stable on a shared machine."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter_ns() - t0) / number)
    return min(runs)


def _bare() -> None:
    return None


def baseline_ns() -> float:
    """A bare Python function call through the same loop: the unit every bar is stated in."""
    return per_call_ns(_bare, number=1_000_000)


def once_s(fn: Callable[[], object], repeat: int = 5) -> float:
    """Median wall time in seconds of single calls (for operations too slow to loop)."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def pct(xs: Iterable[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ``xs`` by nearest rank: the smallest sample with at
    least ``p`` % of the samples at or below it (an observed value, never an interpolation);
    nan when there are none."""
    s = sorted(xs)
    if not s:
        return float("nan")
    return s[max(0, math.ceil(p * len(s) / 100) - 1)]


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` so far (of its thread ``tid`` when given),
    from /proc (Linux): the figure least distorted by other load on a shared machine."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold ")"
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (thousands of client sockets);
    returns the soft limit now in force."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"CPython {sys.version.split()[0]}"
    )


def make_service(i: int, nodes: int, revision: int = 1) -> Service:
    """Service ``service-NNNNN`` with ``nodes`` distinct nodes of mixed weights (bench data)."""
    return Service(
        f"service-{i:05d}",
        tuple(
            Node(f"10.{i % 250}.{k // 250}.{k % 250}", 8000 + k, 1 + k % 3, "up", {"zone": "z1"})
            for k in range(nodes)
        ),
        revision=revision,
    )


def routed(nodes: tuple[Node, ...]) -> list[Service]:
    """The services of the routing rows: ``sub`` with versions v1/v2 and no zones (the other
    services have none either: on a machine in zone "a" they spill, as before), ``zoned`` with
    zones a/b too (bench_pick.py, bench_callgrind.py)."""
    versions = [{"version": f"v{1 + (i // 2) % 2}"} for i in range(len(nodes))]
    return [
        Service("sub", tuple(n._replace(meta=m) for n, m in zip(nodes, versions, strict=True))),
        Service(
            "zoned",
            tuple(
                n._replace(meta={**m, "zone": "ab"[i % 2]})
                for i, (n, m) in enumerate(zip(nodes, versions, strict=True))
            ),
        ),
    ]


def rss_kib(pid: int | str = "self") -> dict[str, int]:
    """Resident memory of a process in KiB, from /proc (Linux): total, anonymous, file, shmem."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[name] = int(value.split()[0])
    return fields


def run_info() -> dict[str, str]:
    """Who produced a result: the machine, the Python, the command line and when."""
    import shlex

    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "?"
    command = "uv run python " + shlex.join([script, *sys.argv[1:]])
    suite = os.environ.get("CLUSTERMAP_BENCH_SUITE")
    if suite:  # a step of bench/run.py
        command += f"  (in: uv run --group bench python {suite})"
    return {
        "machine": machine(),
        "python": sys.version.split()[0],
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def write_json(path: str | None, results: dict[str, object]) -> None:
    """Save ``results`` (with :func:`run_info`) to ``path`` as JSON, when a path is given."""
    if not path:
        return
    import json
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": run_info(), "results": results}, indent=2) + "\n")


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    """A real cm-server on a free loopback port, ready at once and quiet (no warm-up, leases
    of 600 s, warnings only), with ``args`` added; returns the process and its address."""
    address = f"127.0.0.1:{free_port()}"
    exe = str(Path(sys.executable).with_name("cm-server"))
    argv = [exe, "--listen", address, "--warmup", "0", "--heartbeat-ttl", "600"]
    argv += ["--log-level", "warning", *args]
    return subprocess.Popen(argv, start_new_session=True), address
