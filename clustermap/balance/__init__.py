"""Load balancing: pure pickers over a decoded :class:`~clustermap.model.Service`.

No I/O, threads or sockets; a worker builds one :class:`ServicePicker` per service version and
calls :meth:`ServicePicker.pick` on every request. docs/hashing.md specifies the consistent
hashing so other implementations (and ``cmctl pick --key``) agree byte for byte.
"""

from __future__ import annotations

from clustermap.balance.hashing import (
    MAGLEV_TABLE_SIZE,
    build_ketama,
    build_maglev,
    canonical_name,
    key_hash,
)
from clustermap.balance.picker import HASHES, STRATEGIES, MaglevTable, ServicePicker
from clustermap.balance.schedule import smooth_wrr

__all__ = [
    "HASHES",
    "MAGLEV_TABLE_SIZE",
    "STRATEGIES",
    "MaglevTable",
    "ServicePicker",
    "build_ketama",
    "build_maglev",
    "canonical_name",
    "key_hash",
    "smooth_wrr",
]
