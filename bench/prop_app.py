"""The WSGI app bench_propagation.py runs under gunicorn: what this worker's pick() sees.

Each change the benchmark makes registers one more node on port ``2 + i``, so the highest port
among the nodes this worker sees tells which changes it has seen. The answer is
``"<pid> <highest port> <time_ns> <time_ns before> <cpu_ns>"``: the time taken right after the
pick, the one taken right before it (a pick that began after a change was published must see
it), and the CPU time the pick took (its wall time on a busy machine includes being preempted).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import clustermap


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    before, cpu = time.time_ns(), time.thread_time_ns()
    clustermap.pick("prop")
    seen = max(node.port for node in clustermap.nodes("prop"))
    cpu = time.thread_time_ns() - cpu
    body = f"{os.getpid()} {seen} {time.time_ns()} {before} {cpu}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
