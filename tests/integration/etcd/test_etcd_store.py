"""The registry over EtcdStore, in process, beyond the shared contract: determinism across
replicas, history, watch reloads, the prober's election and its fence, expiry counting."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from clustermap.model import DOWN, UP
from clustermap.server.etcd_client import parse_etcd_url
from clustermap.server.etcd_store import EtcdStore
from clustermap.server.registry import (
    DELTA,
    FULL,
    Deposed,
    RegisterResult,
    Registry,
    StaticNode,
)
from clustermap.server.validation import NodeAddress, Registration
from tests.integration.etcd.harness import EtcdCluster, start_cluster
from tests.support.procs import wait_for

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    c = start_cluster(1)
    yield c
    c.close()


@pytest.fixture
def make(etcd: EtcdCluster) -> Iterator[Callable[[], Registry]]:
    """Factory of registries (replicas) on one fresh prefix."""
    prefix = f"/store-{next(_prefixes)}/"
    made: list[EtcdStore] = []

    def new() -> Registry:
        store = EtcdStore(etcd.endpoints, prefix)
        made.append(store)
        return Registry(store, warmup=0, log_size=100)

    yield new
    for s in made:
        s.close()


def reg(service: str, port: int, **kw: object) -> Registration:
    return Registration(service=service, host="h", port=port, ttl=0.0, **kw)  # type: ignore[arg-type]


def test_parse_etcd_url() -> None:
    assert parse_etcd_url("etcd://a:1,b:2") == (["a:1", "b:2"], "/clustermap/")
    assert parse_etcd_url("etcd://[::1]:2379/x/y/") == (["::1:2379"], "/x/y/")
    for bad in ("http://a:1", "etcd://a", "etcd://a:x", "etcd://"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_etcd_url(bad)


def test_a_late_replica_computes_the_same_map_and_service_revisions(
    make: Callable[[], Registry],
) -> None:
    a, b = make(), make()
    for port in (1, 2, 3):
        a.register(reg("x", port))
    a.register(reg("y", 1))
    rev = a.deregister(NodeAddress(service="x", host="h", port=2))  # x's revision: its newest
    wait_for(lambda: b.revision >= rev, 10, "b to follow")
    late = make()
    assert late.epoch == a.epoch == b.epoch
    for r in (a, b, late):
        assert r.services()[1] == a.services()[1]
        assert r.status().checksum == a.status().checksum


def test_history_answers_older_revisions_until_compacted(make: Callable[[], Registry]) -> None:
    a = make()
    a.register(reg("x", 1))
    r1 = a.register(reg("y", 1)).revision
    a.register(reg("x", 2))
    late = make()  # its change log starts after r1
    ans = late.poll(late.epoch, r1)
    assert (ans.kind, [s.service.name for s in ans.services]) == (DELTA, ["x"])
    a.deregister(NodeAddress(service="y", host="h", port=1))
    wait_for(lambda: late.revision == a.revision, 10, "late to follow")
    ans = late.poll(late.epoch, r1)  # history + this replica's own log
    assert (ans.kind, ans.removed, [s.service.name for s in ans.services]) == (DELTA, ("y",), ["x"])
    store = late.store
    assert isinstance(store, EtcdStore)
    store.compact()
    assert late.poll(late.epoch, r1 - 1).kind == FULL


def test_a_watch_cancelled_by_compaction_reloads(make: Callable[[], Registry]) -> None:
    a, b = make(), make()
    a.register(reg("x", 1))
    wait_for(lambda: b.revision == a.revision, 10, "b to follow")
    before = b.revision
    store = b.store
    assert isinstance(store, EtcdStore)
    with b._lock:  # hold b's watch thread while its stream breaks and history moves on
        store._call.cancel()
        a.register(reg("x", 2))
        a.register(reg("y", 1))
        a.deregister(NodeAddress(service="x", host="h", port=1))
        store.compact()
    wait_for(lambda: store.reloads == 1, 30, "b to reload after compaction")
    wait_for(lambda: b.revision >= a.revision, 10, "b to catch up")
    assert b.services()[1] == a.services()[1]
    assert b.poll(b.epoch, before).kind == FULL


def test_a_deposed_leaders_late_verdict_is_refused(make: Callable[[], Registry]) -> None:
    a, b = make(), make()
    stop = threading.Event()
    ea, eb = a.store.election(1, "a"), b.store.election(1, "b")
    term_a = ea.campaign(stop)
    assert term_a is not None
    a.set_static({"db": [StaticNode("10.0.0.1", 80)]}, term_a)
    assert a.set_probe_statuses([("db", "10.0.0.1", 80, UP)], term_a)
    won: list[object] = []
    t = threading.Thread(target=lambda: won.append(eb.campaign(stop)))
    t.start()
    wait_for(lambda: b.revision >= a.revision, 10, "b to follow")
    assert t.is_alive()  # b waits in line while a leads
    ea.resign()  # a is cut off: its lease ends (as when it expires), b leads
    t.join(30)
    term_b = won[0]
    assert term_b is not None
    assert term_b != term_a
    with pytest.raises(Deposed):  # a's late verdict is refused by the fence
        a.set_probe_statuses([("db", "10.0.0.1", 80, DOWN)], term_a)
    assert not ea.leading(term_a)
    assert b.set_probe_statuses([("db", "10.0.0.1", 80, DOWN)], term_b)  # type: ignore[arg-type]
    wait_for(lambda: a.services()[1][0].nodes[0].status == DOWN, 10, "b's verdict everywhere")
    eb.resign()


def test_lease_expiry_is_counted_and_deregistration_is_not(make: Callable[[], Registry]) -> None:
    a, b = make(), make()
    a.register(reg("gone", 1))
    a.deregister(NodeAddress(service="gone", host="h", port=1))
    a.register(Registration(service="x", host="h", port=1, ttl=1.0))
    wait_for(lambda: a.services()[1] == [] and b.services()[1] == [], 30, "the lease to expire")
    assert a.status().leases_expired == b.status().leases_expired == 1


class _LaggingWatch:
    """Stands between a store and its registry: holds the store's reports while ``open`` is
    clear, as a watch lagging behind etcd does (everything else is the real registry)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.open = threading.Event()
        self.open.set()

    @property
    def revision(self) -> int:
        return self.registry.revision

    def loaded(self, epoch: str, revision: int, entries: Any) -> None:
        self.open.wait()
        self.registry.loaded(epoch, revision, entries)

    def changed(self, revision: int, events: Any) -> None:
        self.open.wait()
        self.registry.changed(revision, events)


def _lagging(r: Registry) -> _LaggingWatch:
    store = r.store
    assert isinstance(store, EtcdStore)
    gate = _LaggingWatch(r)
    store._listener = gate
    return gate


def test_a_write_is_answered_from_its_commit_without_waiting_for_the_watch(
    make: Callable[[], Registry],
) -> None:
    a, b = make(), make()
    a.register(reg("x", 1))
    wait_for(lambda: b.revision == a.revision, 10, "b to follow")
    before = a.revision
    gate = _lagging(a)
    gate.open.clear()  # a's watch delivers nothing from here on
    try:
        done = a.register(reg("x", 2))  # committed right after a's revision: folded in at once
        assert done.revision == a.revision > before
        ans = a.poll(a.epoch, before)  # read-your-writes on the same replica
        assert ans.kind == DELTA
        assert [n.port for n in ans.services[0].service.nodes] == [1, 2]
        assert [n.port for n in a.service("x")[1].service.nodes] == [1, 2]
        gone = a.deregister(NodeAddress(service="x", host="h", port=1))
        assert gone == a.revision
        assert [n.port for n in a.service("x")[1].service.nodes] == [2]
        wait_for(lambda: b.revision == a.revision, 10, "the other replica to follow")
        assert b.services()[1] == a.services()[1]
        assert b.status().checksum == a.status().checksum
    finally:
        gate.open.set()  # the watch's late reports of those writes change nothing
    b.register(reg("y", 1))  # someone else's write still arrives through the watch
    wait_for(lambda: a.revision == b.revision, 10, "a's watch to deliver b's write")
    assert a.services()[1] == b.services()[1]
    assert a.status().checksum == b.status().checksum
    assert [s.service.name for s in a.poll(a.epoch, before).services] == ["x", "y"]


def test_a_write_past_someone_elses_revision_waits_for_the_watch(
    make: Callable[[], Registry],
) -> None:
    a, b = make(), make()
    a.register(reg("x", 1))
    wait_for(lambda: b.revision == a.revision, 10, "b to follow")
    gate = _lagging(a)
    gate.open.clear()
    held = a.revision
    other = b.register(reg("x", 2)).revision  # a has not seen this one
    result: list[RegisterResult] = []
    t = threading.Thread(target=lambda: result.append(a.register(reg("x", 3))))
    t.start()
    try:
        wait_for(lambda: len(b.services()[1][0].nodes) == 3, 10, "a's write to commit")
        # a cannot fold its write over b's unseen one: its map stays a true etcd revision
        assert a.revision == held
        assert [n.port for n in a.services()[1][0].nodes] == [1]
    finally:
        gate.open.set()
    t.join(30)
    assert len(result) == 1
    assert result[0].revision > other
    assert [n.port for n in a.services()[1][0].nodes] == [1, 2, 3]
    wait_for(lambda: b.revision == a.revision, 10, "b to follow")
    assert a.status().checksum == b.status().checksum
