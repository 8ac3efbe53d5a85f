"""Stage timestamps along the path of a change, for benchmarks (bench/bench_propagation.py).

Off unless ``$CLUSTERMAP_TRACE`` names a file when the process starts. Then each :func:`mark`
appends one line ``"<stage> <revision> <time_ns> <pid>"`` to it with a single ``O_APPEND``
write (atomic for lines this short, so cm-server, cm-sidecar and workers can share one file).
Off, a mark costs one global lookup and a test; the stages are listed in docs/performance.md
(the propagation section). Nothing here is a contract: names and lines may change with the
benchmark that reads them.
"""

from __future__ import annotations

import contextlib
import os
import time

__all__ = ["ENV", "enabled", "mark"]

#: The variable naming the trace file.
ENV = "CLUSTERMAP_TRACE"

_fd = -1


def _open() -> int:
    path = os.environ.get(ENV)
    if not path:
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return -1  # tracing is a benchmark's aid: never a reason to fail


_fd = _open()


def enabled() -> bool:
    return _fd >= 0


def mark(stage: str, revision: int) -> None:
    """Record that the change to ``revision`` reached ``stage`` now (when tracing is on)."""
    if _fd < 0:
        return
    with contextlib.suppress(OSError):  # a full disk must not stop the map
        os.write(_fd, f"{stage} {revision} {time.time_ns()} {os.getpid()}\n".encode())
