"""Whole-map polls answered again on the loop, from the answer made before: only while the
registry is where it was (revision, epoch, self-preservation, its store followed)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clustermap import wire
from clustermap._pb.clustermap.v1 import subscription_pb2
from clustermap.server.registry import Registry
from clustermap.server.servicers import SubscriptionServicer
from clustermap.server.serving import LoopThread
from clustermap.server.store import MemoryStore
from clustermap.server.validation import Registration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread(2)
    yield lt
    lt.stop()


def test_poll_answers_kept_on_the_loop_follow_revision_and_flags(
    loop: LoopThread,
) -> None:
    clock = Clock()
    registry = Registry(
        MemoryStore(clock=clock), clock=clock, warmup=0, self_preservation_min_nodes=3
    )
    servicer = SubscriptionServicer(registry, loop)
    leases = [
        registry.register(Registration(service="a", host="h", port=p, ttl=10.0)).lease_id
        for p in (1, 2, 3)
    ]

    def poll(epoch: str, revision: int) -> tuple[bytes, subscription_pb2.PollResponse]:
        data = loop.call(servicer.Poll(wire.poll_request(epoch, revision), None), 30)
        return data, subscription_pb2.PollResponse.FromString(data)

    first, full = poll("", 0)
    assert full.kind == subscription_pb2.POLL_KIND_FULL
    again, _ = poll("", 0)
    assert again is first  # the same answer, not made again
    same, ans = poll(full.epoch, full.revision)
    assert ans.kind == subscription_pb2.POLL_KIND_NOT_MODIFIED
    assert poll(full.epoch, full.revision)[0] is same

    clock.now += 11  # every heartbeat stopped at once: self-preservation, same revision
    assert registry.expire() == []
    assert registry.revision == full.revision
    _, ans = poll(full.epoch, full.revision)
    assert ans.kind == subscription_pb2.POLL_KIND_NOT_MODIFIED
    assert ans.self_preservation  # not the answer kept from before the flag

    registry.heartbeat(leases[0])
    registry.register(Registration(service="b", host="h", port=1, ttl=0.0))
    _, ans = poll(full.epoch, full.revision)  # a new revision: not the kept NOT_MODIFIED
    assert ans.kind == subscription_pb2.POLL_KIND_DELTA
    assert [s.name for s in ans.services] == ["b"]
    data, ans = poll("", 0)
    assert data is not first
    assert [s.name for s in ans.services] == ["a", "b"]
