"""ClusterMap: live service discovery for prefork Python workers.

``pick("svc")`` reads the shared-memory region that ``cm-sidecar`` publishes
(``$CLUSTERMAP_REGION``, by default ``/dev/shm/clustermap/default.region``). It opens no socket,
starts no thread and imports neither gRPC, protobuf nor pydantic: safe in any worker model.
"""

from __future__ import annotations

import os as _os

from clustermap.client import ClusterMap
from clustermap.errors import (
    ClusterMapError,
    CorruptRegion,
    NoAvailableNode,
    RegionUnavailable,
    UnknownService,
)
from clustermap.model import Node, Service

__all__ = [
    "ClusterMap",
    "ClusterMapError",
    "CorruptRegion",
    "NoAvailableNode",
    "Node",
    "RegionUnavailable",
    "Service",
    "UnknownService",
    "nodes",
    "open",
    "pick",
]

__version__ = "0.1.0"

#: The process-wide default map; it touches the region only on first use.
_default = ClusterMap(lazy=True)

#: ``pick(service, key=None, *, strategy=None) -> Node`` on the default map (see ClusterMap.pick).
pick = _default.pick

#: ``nodes(service) -> tuple[Node, ...]``: the healthy nodes on the default map.
nodes = _default.nodes


def open(path: str | _os.PathLike[str]) -> ClusterMap:
    """An explicit handle on the region at ``path``, with ``pick``, ``nodes`` and ``service``."""
    return ClusterMap(path)
