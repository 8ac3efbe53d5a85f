"""The shared-memory region: the contract between the sidecar (writer) and workers (readers).

``layout`` is the pure byte format, ``lock`` the robust mutex, ``writer`` and ``reader`` the I/O.
``docs/region-format.md`` describes the format for implementers in other languages.
"""

from __future__ import annotations

from clustermap.region.layout import FORMAT_VERSION, Meta
from clustermap.region.reader import RegionReader, Snapshot

__all__ = ["FORMAT_VERSION", "Meta", "RegionReader", "RegionWriter", "Snapshot"]


def __getattr__(name: str) -> object:
    # The writer pulls in ctypes and the pthread bindings; workers never need it.
    if name == "RegionWriter":
        from clustermap.region.writer import RegionWriter

        return RegionWriter
    raise AttributeError(name)
