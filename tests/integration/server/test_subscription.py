"""Subscription semantics against a real cm-server: full, delta, not-modified, epochs, log
overflow, filters, checksums, warm-up and the Watch stream."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2

from clustermap import checksum
from clustermap._pb.clustermap.v1 import registry_pb2, subscription_pb2
from clustermap.wire import (
    DELTA,
    FULL,
    NOT_MODIFIED,
    NOT_READY,
    PollAnswer,
    poll_answer_from_pb,
    poll_request,
)
from tests.integration.server.conftest import wait_for


class Subscriber:
    """A minimal, strict sidecar model: applies answers and verifies every checksum."""

    def __init__(self, srv, services=()) -> None:
        self.stub = srv.subscription()
        self.filter = tuple(services)
        self.epoch, self.revision = "", 0
        self.services: dict = {}

    def poll(self) -> PollAnswer:
        ans = poll_answer_from_pb(
            self.stub.Poll(poll_request(self.epoch, self.revision, self.filter), timeout=5)
        )
        self.apply(ans)
        return ans

    def apply(self, ans: PollAnswer) -> None:
        if ans.kind == NOT_READY:
            return
        if ans.kind == FULL:
            self.services = {s.name: s for s in ans.services}
        elif ans.kind == DELTA:
            for name in ans.removed:
                self.services.pop(name, None)
            self.services.update({s.name: s for s in ans.services})
        digests = [checksum.service_digest(s) for s in self.services.values()]
        assert checksum.map_checksum(digests) == ans.checksum, ans
        self.epoch, self.revision = ans.epoch, ans.revision

    def nodes(self, name: str) -> list[int]:
        return [n.port for n in self.services[name].nodes]


def memory_revision(srv, expected: int, actual: int) -> None:
    """In memory every change bumps the revision by exactly one (with etcd: by at least one)."""
    if srv.store == "memory":
        assert actual == expected


def reg(srv, service: str, port: int, **kw) -> registry_pb2.RegisterResponse:
    return srv.registry().Register(
        registry_pb2.RegisterRequest(service=service, host="10.0.0.1", port=port, **kw)
    )


def dereg(srv, service: str, port: int) -> int:
    return (
        srv.registry()
        .Deregister(registry_pb2.DeregisterRequest(service=service, host="10.0.0.1", port=port))
        .revision
    )


def test_full_then_not_modified_then_delta(server):
    srv = server()
    reg(srv, "a", 1)
    last = reg(srv, "b", 1).revision
    memory_revision(srv, 2, last)
    sub = Subscriber(srv)
    ans = sub.poll()
    assert ans.kind == FULL
    assert sorted(sub.services) == ["a", "b"]
    assert ans.revision == last
    ans = sub.poll()
    assert ans.kind == NOT_MODIFIED
    assert ans.revision == last
    reg(srv, "a", 2)
    ans = sub.poll()
    assert ans.kind == DELTA
    assert [s.name for s in ans.services] == ["a"]
    assert ans.removed == ()
    assert sub.nodes("a") == [1, 2]
    dereg(srv, "b", 1)
    ans = sub.poll()
    assert ans.kind == DELTA
    assert ans.removed == ("b",)
    assert ans.services == ()
    assert sorted(sub.services) == ["a"]


def test_delta_covers_many_changes_and_each_service_once(server):
    srv = server()
    sub = Subscriber(srv)
    sub.poll()
    for port in range(1, 6):
        reg(srv, "a", port)
    reg(srv, "b", 1)
    last = dereg(srv, "a", 3)
    memory_revision(srv, 7, last)
    ans = sub.poll()
    assert ans.kind == DELTA
    assert ans.revision == last
    assert sorted(s.name for s in ans.services) == ["a", "b"]
    assert sub.nodes("a") == [1, 2, 4, 5]


def test_service_digest_on_the_wire_matches_checksum_module(server):
    srv = server()
    reg(srv, "a", 1, weight=3, meta={"z": "1", "a": "2"})
    raw = srv.subscription().Poll(subscription_pb2.PollRequest())
    from clustermap.wire import service_from_pb

    svc = service_from_pb(raw.services[0], check_digest=True)
    assert raw.services[0].digest == checksum.service_digest(svc)
    assert raw.checksum == raw.services[0].digest


def test_wrong_epoch_or_future_revision_gets_full(server):
    srv = server()
    reg(srv, "a", 1)
    stub = srv.subscription()
    first = stub.Poll(subscription_pb2.PollRequest())
    other = stub.Poll(subscription_pb2.PollRequest(epoch="someone-else", revision=first.revision))
    assert other.kind == subscription_pb2.POLL_KIND_FULL
    assert len(other.services) == 1
    future = stub.Poll(
        subscription_pb2.PollRequest(epoch=first.epoch, revision=first.revision + 1000)
    )
    assert future.kind == subscription_pb2.POLL_KIND_FULL
    assert future.checksum == first.checksum
    # in memory nothing changed; an etcd replica first writes its barrier key to catch up
    memory_revision(srv, first.revision, future.revision)
    assert first.revision <= future.revision < first.revision + 1000


@pytest.mark.memory_only("etcd's map and epoch outlive a restart (the epoch is per etcd prefix)")
def test_restarted_server_has_a_new_epoch_so_old_revisions_get_full(server):
    srv1 = server()
    reg(srv1, "a", 1)
    sub = Subscriber(srv1)
    sub.poll()
    srv2 = server()
    reg(srv2, "b", 1)  # same revision number (1), different history
    sub.stub = srv2.subscription()
    ans = sub.poll()
    assert ans.kind == FULL
    assert sorted(sub.services) == ["b"]


@pytest.mark.memory_only("etcd answers revisions older than the change log from its history")
def test_revision_older_than_change_log_gets_full(server):
    srv = server("--change-log-size", "3")
    sub = Subscriber(srv)
    sub.poll()
    reg(srv, "a", 1)
    old = Subscriber(srv)
    old.poll()
    for port in range(2, 7):
        reg(srv, "a", port)
    assert old.poll().kind == FULL
    recent = Subscriber(srv)
    recent.poll()
    reg(srv, "a", 7)
    reg(srv, "a", 8)
    assert recent.poll().kind == DELTA
    assert sub.poll().kind == FULL


def test_service_filter_limits_answers_and_checksum(server):
    srv = server()
    reg(srv, "a", 1)
    reg(srv, "b", 1)
    sub = Subscriber(srv, services=["a", "missing"])
    ans = sub.poll()
    assert ans.kind == FULL
    assert sorted(sub.services) == ["a"]
    last = reg(srv, "b", 2).revision
    memory_revision(srv, 3, last)
    ans = sub.poll()
    assert ans.kind == NOT_MODIFIED
    assert ans.revision == last
    reg(srv, "missing", 1)
    ans = sub.poll()
    assert ans.kind == DELTA
    assert sorted(sub.services) == ["a", "missing"]


def test_invalid_filter_is_rejected(server):
    srv = server()
    with pytest.raises(grpc.RpcError) as err:
        srv.subscription().Poll(subscription_pb2.PollRequest(services=["x" * 500]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# Long enough that the first calls surely fall inside it, even on a loaded machine (the end of
# the warm-up is awaited, never assumed): these tests are about what happens *during* warm-up.
WARMUP = "6"


def test_warmup_answers_not_ready_and_never_an_empty_map(server):
    srv = server("--warmup", WARMUP)
    stub = srv.subscription()
    ans = poll_answer_from_pb(stub.Poll(poll_request()))
    assert ans.kind == NOT_READY
    assert ans.services == ()
    assert ans.retry_after > 0
    assert srv.health("") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert srv.health("clustermap.v1.Subscription") == health_pb2.HealthCheckResponse.NOT_SERVING
    # registrations are accepted while warming (nodes re-registering after a restart)
    reg(srv, "a", 1)
    ans = poll_answer_from_pb(stub.Poll(poll_request()))
    assert ans.kind == NOT_READY
    wait_for(
        lambda: srv.health("") == health_pb2.HealthCheckResponse.SERVING,
        timeout=30,
        what="warm-up end",
    )
    sub = Subscriber(srv)
    ans = sub.poll()
    assert ans.kind == FULL
    assert sorted(sub.services) == ["a"]


def test_watch_streams_changes(server):
    srv = server("--watch-keepalive", "0.3")
    reg(srv, "a", 1)
    stub = srv.subscription()
    stream = stub.Watch(subscription_pb2.PollRequest(), timeout=20)
    sub = Subscriber(srv)
    first = poll_answer_from_pb(next(stream))
    assert first.kind == FULL
    sub.apply(first)
    reg(srv, "a", 2)
    # keepalives (NOT_MODIFIED) may come first if the registration took longer than 0.3 s
    ans = poll_answer_from_pb(next(stream))
    while ans.kind == NOT_MODIFIED:
        assert ans.revision == first.revision
        ans = poll_answer_from_pb(next(stream))
    assert ans.kind == DELTA
    sub.apply(ans)
    assert sub.nodes("a") == [1, 2]
    keepalive = poll_answer_from_pb(next(stream))  # nothing changed: keepalive
    assert keepalive.kind == NOT_MODIFIED
    assert keepalive.revision == ans.revision
    stream.cancel()


def test_watch_during_warmup_sends_not_ready_then_full(server):
    srv = server("--warmup", WARMUP)
    reg(srv, "a", 1)
    stream = srv.subscription().Watch(subscription_pb2.PollRequest(), timeout=60)
    kinds = []
    for msg in stream:
        kinds.append(poll_answer_from_pb(msg).kind)
        if kinds[-1] == FULL:
            break
    stream.cancel()
    assert kinds[0] == NOT_READY
    assert set(kinds[1:-1]) <= {NOT_READY}
    assert kinds[-1] == FULL


def test_many_concurrent_pollers_see_consistent_answers(server):
    srv = server()
    reg(srv, "a", 1)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sub = Subscriber(srv)
            for _ in range(30):
                sub.poll()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for port in range(2, 40):
        reg(srv, "a", port)
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
