"""The map checksum: one 64-bit number per service and a sum over them for the whole map.

The server sends the checksum of the map each poll answer leaves the subscriber with, so a sidecar
that applied a delta can check its result without trusting it blindly. Both sides use this module;
it is pure (stdlib, xxhash, msgpack and :mod:`clustermap.model` only) so the sidecar and tests can
use it without gRPC.

Service digest (:func:`service_digest`) is ``xxh3_64`` (seed 0) of this msgpack document (msgpack
spec encoding as produced by ``msgpack.packb(doc, use_bin_type=True)``; Python ints as the smallest
msgpack int, floats as float64, strings as UTF-8 str)::

    ["cm1",                          # format tag: bumped if the encoding ever changes
     name,                           # str
     [[host, port, weight, status, [[key, value], ...]], ...],
                                     # nodes sorted by (host, port); meta pairs sorted by key
     strategy,                       # str
     panic_threshold,                # float64
     [[key, value], ...]]            # service meta, sorted by key

``Service.revision`` and node origin are *not* part of it: two maps with the same content have the
same checksum whatever history produced them.

Map checksum (:func:`map_checksum`) is the sum of the service digests modulo 2**64, so adding,
replacing or removing one service updates it in O(1) (:func:`update_checksum`). The empty map's
checksum is 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

import msgpack
import xxhash

from clustermap.model import Node, Service

__all__ = ["FORMAT_TAG", "MASK", "map_checksum", "service_digest", "update_checksum"]

FORMAT_TAG: Final = "cm1"
MASK: Final = (1 << 64) - 1


def _pairs(meta: Mapping[str, str]) -> list[list[str]]:
    return [[k, meta[k]] for k in sorted(meta)]


def _node_doc(node: Node) -> list[object]:
    return [node.host, int(node.port), int(node.weight), node.status, _pairs(node.meta)]


def service_digest(service: Service) -> int:
    """The 64-bit digest of everything a subscriber can observe in ``service``."""
    nodes = sorted(service.nodes, key=lambda n: (n.host, n.port))
    doc = [
        FORMAT_TAG,
        service.name,
        [_node_doc(n) for n in nodes],
        service.strategy,
        float(service.panic_threshold),
        _pairs(service.meta),
    ]
    return xxhash.xxh3_64_intdigest(msgpack.packb(doc, use_bin_type=True))


def map_checksum(digests: Iterable[int]) -> int:
    """The checksum of a map given its services' digests (order does not matter)."""
    return sum(digests) & MASK


def update_checksum(checksum: int, old: int | None, new: int | None) -> int:
    """``checksum`` after one service's digest went from ``old`` to ``new`` (None: absent)."""
    if old is not None:
        checksum -= old
    if new is not None:
        checksum += new
    return checksum & MASK
