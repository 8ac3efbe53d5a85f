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
    InvalidSubset,
    NoAvailableNode,
    RegionUnavailable,
    UnknownService,
)
from clustermap.model import Node, Service

__all__ = [
    "ClusterMap",
    "ClusterMapError",
    "CorruptRegion",
    "InvalidSubset",
    "NoAvailableNode",
    "Node",
    "RegionUnavailable",
    "Service",
    "UnknownService",
    "call",
    "nodes",
    "open",
    "pick",
    "report",
]

__version__ = "0.1.0"

#: The process-wide default map; it touches the region only on first use.
_default = ClusterMap(lazy=True)

#: ``pick(service, key=None, strategy=None, subset=None) -> Node`` on the default map (see
#: ClusterMap.pick; subsets and zones: docs/routing.md).
pick = _default.pick

#: ``nodes(service, subset=None) -> tuple[Node, ...]``: the healthy nodes on the default map.
nodes = _default.nodes

#: ``with call(service, key=None, strategy=None, subset=None) as node:`` a pick counted in flight
#: machine-wide and judged by how the block ends (see ClusterMap.call, docs/feedback.md).
call = _default.call

#: ``report(service, node, ok, latency=None) -> bool``: one finished call, without a with-block.
report = _default.report


def open(path: str | _os.PathLike[str]) -> ClusterMap:
    """An explicit handle on the region at ``path``: ``pick``, ``nodes``, ``service``, ``call``,
    ``report``."""
    return ClusterMap(path)
