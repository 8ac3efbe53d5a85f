"""The sidecar's per-server failover backoff; it lives in :mod:`clustermap.retry`."""

from __future__ import annotations

from clustermap.retry import Backoff

__all__ = ["Backoff"]
