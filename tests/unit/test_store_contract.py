"""The storage contract every :class:`~clustermap.server.store.NodeStore` meets, run against the
in-memory store and the etcd store (a real single-member etcd; skipped if etcd is missing): node
records under guarded transactions, leases, and the events the registry is fed."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from clustermap.server.store import (
    STATIC,
    Delete,
    LeaseGone,
    MemoryStore,
    NodeEntry,
    NodeEvent,
    NodeKey,
    NodeRecord,
    Put,
)
from tests.integration.etcd.harness import EtcdCluster, start_cluster

_prefixes = itertools.count()


class Recorder:
    """A listener keeping the store's entries as it reports them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.epoch = ""
        self.revision = 0
        self.entries: dict[NodeKey, NodeEntry] = {}
        self.expired: list[NodeKey] = []

    def loaded(self, epoch: str, revision: int, entries: Mapping[NodeKey, NodeEntry]) -> None:
        with self.cond:
            self.epoch, self.revision, self.entries = epoch, revision, dict(entries)
            self.cond.notify_all()

    def changed(self, revision: int, events: Sequence[NodeEvent]) -> None:
        with self.cond:
            for ev in events:
                if ev.entry is None:
                    self.entries.pop(ev.key, None)
                    if ev.expired:
                        self.expired.append(ev.key)
                else:
                    self.entries[ev.key] = ev.entry
            self.revision = revision
            self.cond.notify_all()

    def reach(self, revision: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.revision >= revision, 30)


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    c = start_cluster(1)
    yield c
    c.close()


@pytest.fixture(params=["memory", "etcd"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    rec = Recorder()
    if request.param == "memory":
        s: Any = MemoryStore()
    else:
        from clustermap.server.etcd_store import EtcdStore

        s = EtcdStore(request.getfixturevalue("etcd").endpoints, f"/contract-{next(_prefixes)}/")
    s.start(rec)
    s.rec = rec
    yield s
    s.close()


A: NodeKey = ("a", "h", 1)
B: NodeKey = ("a", "h", 2)


def test_a_new_store_reports_an_empty_map(store: Any) -> None:
    assert store.rec.epoch
    assert store.rec.entries == {}


def test_commit_is_one_revision_and_reaches_the_listener(store: Any) -> None:
    before = store.rec.revision
    rec = NodeRecord(weight=3, meta={"z": "1"}, origin=STATIC, probed=False, admin_status="drain")
    rev, seen = store.commit([Put(A, rec, expect=0), Put(B, NodeRecord(), expect=0)])
    assert rev is not None
    assert rev > before
    assert seen == rev
    store.rec.reach(rev)
    assert store.rec.entries == {A: NodeEntry(rec, rev), B: NodeEntry(NodeRecord(), rev)}


def test_guards_refuse_a_stale_write_and_change_nothing(store: Any) -> None:
    rev, _ = store.commit([Put(A, NodeRecord(), expect=0)])
    assert store.commit([Put(A, NodeRecord(weight=2), expect=0)])[0] is None  # not absent
    assert store.commit([Put(A, NodeRecord(weight=2), expect=rev + 99), Delete(B)])[0] is None
    assert store.commit([Delete(A, expect=rev + 1)])[0] is None
    rev2, _ = store.commit([Put(A, NodeRecord(weight=2), expect=rev)])
    assert rev2 is not None
    store.rec.reach(rev2)
    assert store.rec.entries[A].record.weight == 2


def test_deleting_nothing_adds_no_revision(store: Any) -> None:
    rev, _ = store.commit([Put(A, NodeRecord())])
    done, seen = store.commit([Delete(B)])
    if isinstance(store, MemoryStore):
        assert done == seen == rev
    rev2, _ = store.commit([Delete(A)])
    assert rev2 is not None
    store.rec.reach(rev2)
    assert store.rec.entries == {}
    assert store.rec.expired == []  # a request's delete is not an expiry


def test_leases_keep_alive_and_revoking_deletes_their_keys(store: Any) -> None:
    lease, ttl = store.grant(5)
    assert lease
    assert ttl >= 5
    assert store.keepalive(lease) >= 5
    rev, _ = store.commit([Put(A, NodeRecord(), lease=lease), Put(B, NodeRecord())])
    store.rec.reach(rev)
    assert store.rec.entries[A].lease == lease
    store.revoke(lease)
    store.revoke(lease)  # an unknown lease is not an error
    assert store.keepalive(lease) == 0
    store.rec.reach(rev + 1)
    assert set(store.rec.entries) == {B}
    with pytest.raises(LeaseGone):
        store.commit([Put(A, NodeRecord(), lease=lease)])


def test_a_replaced_lease_no_longer_owns_the_key(store: Any) -> None:
    old, _ = store.grant(5)
    new, _ = store.grant(5)
    store.commit([Put(A, NodeRecord(), lease=old)])
    rev, _ = store.commit([Put(A, NodeRecord(weight=2), lease=new)])
    store.revoke(old)
    store.rec.reach(rev)
    assert store.rec.entries[A] == NodeEntry(NodeRecord(weight=2), rev, new)
    assert store.barrier(rev) >= rev
    store.rec.reach(store.barrier(rev + 1))
    assert A in store.rec.entries


def test_concurrent_guarded_writers_lose_nothing(store: Any) -> None:
    committed: list[int] = []

    def add(port: int) -> None:
        key = ("c", "h", port)
        while (revision := store.commit([Put(key, NodeRecord(), expect=0)])[0]) is None:
            pass
        committed.append(revision)

    threads = [threading.Thread(target=add, args=(p,)) for p in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # every write's own revision, not the listener's (which may still lag behind all but one)
    store.rec.reach(max(committed))
    assert {k[2] for k in store.rec.entries if k[0] == "c"} == set(range(8))
