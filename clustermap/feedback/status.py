"""What ``cmctl status`` says about feedback: read-only, from the files as workers see them."""

from __future__ import annotations

import os
import time
from typing import Any

from clustermap.feedback import layout as L
from clustermap.feedback.ofd import held
from clustermap.feedback.worker import feedback_paths

__all__ = ["feedback_status"]

#: A sweep older than this means no sidecar is reading the rows: ejections stop, loads freeze.
SWEEP_STALE_S = 1.0


def feedback_status(region: str) -> dict[str, Any]:
    """``{"state": "on" | "off", "reason", "rows", "rows_in_use", "entries", "nodes",
    "last_sweep_age_seconds"}``; never raises."""
    rows_path, load_path = feedback_paths(region)
    out: dict[str, Any] = {"state": "off", "reason": "", "path": rows_path}
    try:
        fd = os.open(rows_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        out["reason"] = f"{rows_path}: {exc.strerror}" + (
            " (the sidecar runs with feedback off, or is not running)"
            if isinstance(exc, FileNotFoundError)
            else ""
        )
        return out
    try:
        head = L.parse_feedback_header(os.pread(fd, 64, 0), os.fstat(fd).st_size)
        size = head.row_size
        in_use = sum(held(fd, L.HEADER_SIZE + r * size, size) for r in range(head.rows))
        with open(load_path, "rb") as f:
            raw = f.read(64)
        L.parse_load_header(raw, os.stat(load_path).st_size)
    except (OSError, L.LayoutError) as exc:
        out["reason"] = f"unusable feedback files: {exc}"
        return out
    finally:
        os.close(fd)
    sweep = int.from_bytes(raw[L.SWEEP_OFF : L.SWEEP_OFF + 8], "little")
    age = (time.time_ns() - sweep) / 1e9 if sweep else None
    out.update(
        rows=head.rows,
        rows_in_use=in_use,
        entries=head.entries,
        nodes=L.parse_load_header(raw, os.stat(load_path).st_size).capacity,
        last_sweep_age_seconds=None if age is None else round(age, 3),
    )
    if age is None or age > SWEEP_STALE_S:
        out["reason"] = "no sidecar is sweeping the rows (ejections expire on their own)"
    else:
        out["state"] = "on"
    return out
