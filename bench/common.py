"""Shared timing helpers: medians of repeated runs, and the bare-call baseline every ratio uses."""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable


def per_call_ns(fn: Callable[[], object], number: int = 200_000, repeat: int = 7) -> float:
    """Median ns per call of ``fn`` over ``repeat`` runs of ``number`` calls (loop included)."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter_ns() - t0) / number)
    return statistics.median(runs)


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
