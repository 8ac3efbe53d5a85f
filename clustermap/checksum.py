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

__all__ = [
    "FORMAT_TAG",
    "MASK",
    "map_checksum",
    "pack_node",
    "service_digest",
    "update_checksum",
]

FORMAT_TAG: Final = "cm1"
MASK: Final = (1 << 64) - 1


def _pairs(meta: Mapping[str, str]) -> list[list[str]]:
    return [[k, meta[k]] for k in sorted(meta)]


def _node_doc(node: Node) -> list[object]:
    return [node.host, int(node.port), int(node.weight), node.status, _pairs(node.meta)]


def pack_node(node: Node) -> bytes:
    """One node's entry in the digest document, encoded (for :func:`service_digest` callers
    that keep it with the node: the server, which rebuilds a digest on every change)."""
    return msgpack.packb(_node_doc(node), use_bin_type=True)  # type: ignore[no-any-return]


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


_HEAD: Final = _array_header(6) + msgpack.packb(FORMAT_TAG, use_bin_type=True)


def service_digest(service: Service, packed: Iterable[bytes] | None = None) -> int:
    """The 64-bit digest of everything a subscriber can observe in ``service``.

    ``packed``: the service's nodes already encoded by :func:`pack_node`, in (host, port)
    order (the document is assembled from its encoded parts: the same bytes as packing it
    whole)."""
    if packed is None:
        nodes = sorted(service.nodes, key=lambda n: (n.host, n.port))
        packed = [pack_node(n) for n in nodes]
    parts = [
        _HEAD,
        msgpack.packb(service.name, use_bin_type=True),
        _array_header(len(service.nodes)),
        *packed,
        msgpack.packb(
            [service.strategy, float(service.panic_threshold), _pairs(service.meta)],
            use_bin_type=True,
        )[1:],  # the last three elements of the document, without their array header
    ]
    return xxhash.xxh3_64_intdigest(b"".join(parts))


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
