"""pb ↔ model conversion: round trips and rejection of malformed server data."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from clustermap._pb.clustermap.v1 import map_pb2, subscription_pb2
from clustermap.checksum import service_digest
from clustermap.model import Node, Service
from clustermap.wire import (
    DELTA,
    FULL,
    NOT_READY,
    WireError,
    node_from_pb,
    poll_answer_from_pb,
    poll_request,
    service_from_pb,
    service_to_pb,
    status_from_pb,
    status_to_pb,
)

SVC = Service(
    name="s",
    nodes=(
        Node("b", 2, 3, "drain", MappingProxyType({"k": "v"})),
        Node("a", 1),
    ),
    strategy="consistent_hash",
    panic_threshold=0.3,
    revision=7,
    meta=MappingProxyType({"x": "y"}),
)


def test_service_round_trip_sorts_nodes_and_carries_digest() -> None:
    msg = service_to_pb(SVC)
    assert [n.host for n in msg.nodes] == ["a", "b"]
    assert msg.digest == service_digest(SVC)
    back = service_from_pb(msg, check_digest=True)
    assert back.nodes == tuple(sorted(SVC.nodes, key=lambda n: n.key))
    assert (back.name, back.strategy, back.panic_threshold, back.revision) == (
        "s",
        "consistent_hash",
        0.3,
        7,
    )
    assert dict(back.meta) == {"x": "y"}
    assert service_from_pb(map_pb2.Service.FromString(msg.SerializeToString())) == back


def test_status_mapping() -> None:
    for status in ("up", "down", "drain"):
        assert status_from_pb(status_to_pb(status)) == status
    with pytest.raises(WireError):
        status_from_pb(map_pb2.NODE_STATUS_UNSPECIFIED)


@pytest.mark.parametrize(
    ("node", "why"),
    [
        (map_pb2.Node(host="", port=1, status=1), "empty host"),
        (map_pb2.Node(host="h", port=0, status=1), "port"),
        (map_pb2.Node(host="h", port=70000, status=1), "port"),
        (map_pb2.Node(host="h", port=1, weight=70000, status=1), "weight"),
        (map_pb2.Node(host="h", port=1, status=0), "status"),
    ],
)
def test_bad_nodes_are_rejected(node: map_pb2.Node, why: str) -> None:
    with pytest.raises(WireError, match=why):
        node_from_pb(node)


@pytest.mark.parametrize(
    ("svc", "why"),
    [
        (map_pb2.Service(name=""), "empty name"),
        (map_pb2.Service(name="s", strategy="fastest"), "strategy"),
        (map_pb2.Service(name="s", panic_threshold=1.5), "panic"),
        (map_pb2.Service(name="s", panic_threshold=float("nan")), "panic"),
        (
            map_pb2.Service(
                name="s",
                nodes=[map_pb2.Node(host="h", port=1, status=1)] * 2,
            ),
            "duplicate",
        ),
    ],
)
def test_bad_services_are_rejected(svc: map_pb2.Service, why: str) -> None:
    with pytest.raises(WireError, match=why):
        service_from_pb(svc)


def test_digest_check() -> None:
    msg = service_to_pb(SVC)
    msg.digest ^= 1
    service_from_pb(msg)
    with pytest.raises(WireError, match="digest"):
        service_from_pb(msg, check_digest=True)


def test_poll_answers() -> None:
    full = subscription_pb2.PollResponse(
        kind=subscription_pb2.POLL_KIND_FULL,
        epoch="e",
        revision=3,
        checksum=5,
        services=[service_to_pb(SVC)],
    )
    ans = poll_answer_from_pb(full)
    assert (ans.kind, ans.epoch, ans.revision, ans.checksum) == (FULL, "e", 3, 5)
    assert ans.services[0].name == "s"
    delta = subscription_pb2.PollResponse(
        kind=subscription_pb2.POLL_KIND_DELTA, epoch="e", revision=4, removed=["t"]
    )
    assert poll_answer_from_pb(delta).kind == DELTA
    ready = subscription_pb2.PollResponse(kind=subscription_pb2.POLL_KIND_NOT_READY)
    assert poll_answer_from_pb(ready).kind == NOT_READY
    req = poll_request("e", 4, ["a"])
    assert (req.epoch, req.revision, list(req.services)) == ("e", 4, ["a"])


@pytest.mark.parametrize(
    ("msg", "why"),
    [
        (subscription_pb2.PollResponse(kind=0, epoch="e"), "kind"),
        (subscription_pb2.PollResponse(kind=subscription_pb2.POLL_KIND_FULL), "epoch"),
        (
            subscription_pb2.PollResponse(
                kind=subscription_pb2.POLL_KIND_NOT_MODIFIED, epoch="e", removed=["a"]
            ),
            "carries services",
        ),
        (
            subscription_pb2.PollResponse(
                kind=subscription_pb2.POLL_KIND_FULL, epoch="e", removed=["a"]
            ),
            "removals",
        ),
        (
            subscription_pb2.PollResponse(
                kind=subscription_pb2.POLL_KIND_DELTA,
                epoch="e",
                services=[service_to_pb(SVC)] * 2,
            ),
            "twice",
        ),
        (
            subscription_pb2.PollResponse(
                kind=subscription_pb2.POLL_KIND_DELTA,
                epoch="e",
                services=[service_to_pb(SVC)],
                removed=["s"],
            ),
            "both",
        ),
    ],
)
def test_malformed_poll_answers_are_rejected(msg: subscription_pb2.PollResponse, why: str) -> None:
    with pytest.raises(WireError, match=why):
        poll_answer_from_pb(msg)


def test_a_malformed_service_is_set_aside_and_the_rest_decodes() -> None:
    bad = service_to_pb(Service("bad", (Node("10.0.0.9", 80),)))
    bad.nodes[0].port = 70000
    msg = subscription_pb2.PollResponse(
        kind=subscription_pb2.POLL_KIND_DELTA, epoch="e", services=[service_to_pb(SVC), bad]
    )
    ans = poll_answer_from_pb(msg)
    assert [s.name for s in ans.services] == ["s"]
    [rejected] = ans.rejected
    assert (rejected.name, rejected.digest) == ("bad", bad.digest)  # the server's digest
    assert "port 70000" in rejected.reason
    assert ans.digests == {"s": service_digest(SVC), "bad": bad.digest}
    msg.services[1].name = ""  # not attributable to one service: the whole answer is refused
    with pytest.raises(WireError, match="empty name"):
        poll_answer_from_pb(msg)
