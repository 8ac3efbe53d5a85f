"""Caller feedback through shared memory: the worker writes, the sidecar judges.

``layout`` is the pure byte format of ``<region>.feedback`` (one row per worker process) and
``<region>.load`` (machine-wide calls in flight per node, written by the sidecar); ``worker`` is a
process's side (claim a row, count calls, read loads). docs/feedback.md describes the design.
"""

from __future__ import annotations

__all__: list[str] = []
