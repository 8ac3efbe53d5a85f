"""Conversion between the wire messages (``clustermap._pb``) and :mod:`clustermap.model` values.

Shared by the server (model → pb) and the sidecar (pb → model). Decoding validates what a
malformed or hostile server could send (unknown status or strategy, out-of-range port or weight,
duplicate nodes) and raises :class:`WireError` naming the offending field. A poll answer whose
fault lies in one service decodes with that service set aside as :class:`Rejected`, so a
subscriber keeps that service's last good nodes and takes the rest of the answer. Encoding
trusts its input (it comes from the server's validated registry).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from clustermap._pb.clustermap.v1 import map_pb2, subscription_pb2
from clustermap.checksum import service_digest
from clustermap.model import (
    DELTA,
    DOWN,
    DRAIN,
    FULL,
    NOT_MODIFIED,
    NOT_READY,
    STRATEGIES,
    UP,
    Node,
    Service,
)
from clustermap.rules import MAX_PORT, MAX_WEIGHT

__all__ = [
    "DELTA",
    "FULL",
    "MAX_WEIGHT",
    "NOT_MODIFIED",
    "NOT_READY",
    "PollAnswer",
    "Rejected",
    "WireError",
    "node_from_pb",
    "node_to_pb",
    "poll_answer_from_pb",
    "poll_request",
    "service_from_pb",
    "service_to_pb",
    "status_from_pb",
    "status_to_pb",
]


_STATUS_TO_PB: Final = {
    UP: map_pb2.NODE_STATUS_UP,
    DOWN: map_pb2.NODE_STATUS_DOWN,
    DRAIN: map_pb2.NODE_STATUS_DRAIN,
}
_STATUS_FROM_PB: Final = {v: k for k, v in _STATUS_TO_PB.items()}
_NO_ORIGIN: Final = map_pb2.NODE_ORIGIN_UNSPECIFIED
_KIND_FROM_PB: Final = {
    subscription_pb2.POLL_KIND_NOT_MODIFIED: NOT_MODIFIED,
    subscription_pb2.POLL_KIND_DELTA: DELTA,
    subscription_pb2.POLL_KIND_FULL: FULL,
    subscription_pb2.POLL_KIND_NOT_READY: NOT_READY,
}


class WireError(ValueError):
    """A message from the server is malformed; the message says which field and why."""


def status_to_pb(status: str) -> map_pb2.NodeStatus.ValueType:
    """The wire enum of a model status (``"up"``, ``"down"``, ``"drain"``)."""
    return _STATUS_TO_PB[status]


def status_from_pb(value: int) -> str:
    """The model status of a wire enum value; :class:`WireError` for UNSPECIFIED/unknown."""
    try:
        return _STATUS_FROM_PB[value]  # type: ignore[index]
    except KeyError:
        raise WireError(f"unknown node status {value}") from None


def _meta(pairs: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted(pairs.items())))


def node_to_pb(
    node: Node, origin: map_pb2.NodeOrigin.ValueType = map_pb2.NODE_ORIGIN_UNSPECIFIED
) -> map_pb2.Node:
    return map_pb2.Node(
        host=node.host,
        port=node.port,
        weight=node.weight,
        status=status_to_pb(node.status),
        meta=node.meta,
        origin=origin,
    )


def node_from_pb(msg: map_pb2.Node, where: str = "node") -> Node:
    if not msg.host:
        raise WireError(f"{where}: empty host")
    if not 1 <= msg.port <= MAX_PORT:
        raise WireError(f"{where}: port {msg.port} outside 1-{MAX_PORT}")
    if msg.weight > MAX_WEIGHT:
        raise WireError(f"{where}: weight {msg.weight} above {MAX_WEIGHT}")
    return Node(
        host=msg.host,
        port=msg.port,
        weight=msg.weight,
        status=status_from_pb(msg.status),
        meta=_meta(msg.meta),
    )


def service_to_pb(
    service: Service,
    digest: int | None = None,
    origins: Mapping[tuple[str, int], map_pb2.NodeOrigin.ValueType] | None = None,
) -> map_pb2.Service:
    """Encode ``service`` (nodes sorted by (host, port)); ``digest`` is computed when omitted."""
    nodes = sorted(service.nodes, key=lambda n: (n.host, n.port))
    return map_pb2.Service(
        name=service.name,
        nodes=[
            node_to_pb(n, origins.get(n.key, _NO_ORIGIN) if origins else _NO_ORIGIN) for n in nodes
        ],
        strategy=service.strategy,
        panic_threshold=service.panic_threshold,
        revision=service.revision,
        meta=service.meta,
        digest=service_digest(service) if digest is None else digest,
    )


def service_from_pb(msg: map_pb2.Service, check_digest: bool = False) -> Service:
    """Decode and validate one service; with ``check_digest`` also verify ``msg.digest``."""
    name = msg.name
    if not name:
        raise WireError("service with an empty name")
    strategy = msg.strategy or "round_robin"
    if strategy not in STRATEGIES:
        raise WireError(f"service {name!r}: unknown strategy {strategy!r}")
    panic = msg.panic_threshold
    if not (math.isfinite(panic) and 0.0 <= panic <= 1.0):
        raise WireError(f"service {name!r}: panic_threshold {panic} outside 0-1")
    nodes = tuple(node_from_pb(n, f"service {name!r} node #{i}") for i, n in enumerate(msg.nodes))
    keys = {n.key for n in nodes}
    if len(keys) != len(nodes):
        raise WireError(f"service {name!r}: duplicate node addresses")
    service = Service(
        name=name,
        nodes=tuple(sorted(nodes, key=lambda n: (n.host, n.port))),
        strategy=strategy,
        panic_threshold=panic,
        revision=msg.revision,
        meta=_meta(msg.meta),
    )
    if check_digest and service_digest(service) != msg.digest:
        raise WireError(f"service {name!r}: digest mismatch")
    return service


@dataclass(frozen=True, slots=True)
class Rejected:
    """A service of an answer that the subscriber cannot accept (see docs/sidecar.md): kept out
    of the map, but its ``digest`` (as the server sent it) keeps the map checksum verifiable."""

    name: str
    digest: int
    reason: str


@dataclass(frozen=True, slots=True)
class PollAnswer:
    """A decoded, validated :class:`PollResponse`.

    ``kind`` is one of :data:`NOT_MODIFIED`, :data:`DELTA`, :data:`FULL`, :data:`NOT_READY`.
    ``services`` are the upserts of a delta or the whole map of a full; ``removed`` the names a
    delta removes. See docs/protocol.md for what a subscriber does with each kind.
    """

    kind: str
    epoch: str
    revision: int
    checksum: int
    services: tuple[Service, ...] = ()
    removed: tuple[str, ...] = ()
    self_preservation: bool = False
    retry_after: float = 0.0
    #: Services left out of ``services`` because one of their records is invalid.
    rejected: tuple[Rejected, ...] = ()
    #: Each service's digest as the server sent it (the checksum of a rejected one is the
    #: server's word: what it holds, not what reached us).
    digests: Mapping[str, int] = field(default_factory=dict)


def poll_request(
    epoch: str = "", revision: int = 0, services: Iterable[str] = ()
) -> subscription_pb2.PollRequest:
    """The request for a subscriber whose map is at (``epoch``, ``revision``)."""
    return subscription_pb2.PollRequest(epoch=epoch, revision=revision, services=list(services))


def poll_answer_from_pb(msg: subscription_pb2.PollResponse) -> PollAnswer:
    """Decode and validate a poll answer; :class:`WireError` if anything is off."""
    kind = _KIND_FROM_PB.get(msg.kind)
    if kind is None:
        raise WireError(f"unknown poll answer kind {msg.kind}")
    if kind != NOT_READY and not msg.epoch:
        raise WireError(f"{kind} answer without an epoch")
    decoded: list[Service] = []
    rejected: list[Rejected] = []
    for s in msg.services:
        try:
            decoded.append(service_from_pb(s))
        except WireError as exc:
            if not s.name:
                raise  # not attributable to one service: the whole answer is refused
            rejected.append(Rejected(s.name, s.digest, str(exc)))
    services = tuple(decoded)
    names = [s.name for s in services] + [r.name for r in rejected]
    if len(set(names)) != len(names):
        raise WireError("the same service appears twice in one answer")
    removed = tuple(msg.removed)
    if kind in (NOT_MODIFIED, NOT_READY) and (names or removed):
        raise WireError(f"{kind} answer carries services")
    if kind == FULL and removed:
        raise WireError("full answer carries removals")
    if set(removed) & set(names):
        raise WireError("a service is both upserted and removed")
    return PollAnswer(
        kind=kind,
        epoch=msg.epoch,
        revision=msg.revision,
        checksum=msg.checksum,
        services=services,
        removed=removed,
        self_preservation=msg.self_preservation,
        retry_after=msg.retry_after_seconds,
        rejected=tuple(rejected),
        digests={s.name: s.digest for s in msg.services},
    )
