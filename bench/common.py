"""Shared timing helpers: medians of repeated runs, and the bare-call baseline every ratio uses."""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable

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


def machine() -> str:
    import os

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
