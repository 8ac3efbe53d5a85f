"""ClusterMap: live service discovery for prefork Python workers.

The worker-side API reads a shared-memory region published by ``cm-sidecar``; it opens no socket,
starts no thread and imports neither gRPC, protobuf nor pydantic.
"""

from __future__ import annotations

from clustermap.errors import (
    ClusterMapError,
    CorruptRegion,
    NoAvailableNode,
    RegionUnavailable,
    UnknownService,
)
from clustermap.model import Node, Service

__all__ = [
    "ClusterMapError",
    "CorruptRegion",
    "NoAvailableNode",
    "Node",
    "RegionUnavailable",
    "Service",
    "UnknownService",
]

__version__ = "0.1.0"
