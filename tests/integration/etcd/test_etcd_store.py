"""EtcdStore beyond the shared contract: determinism across replicas, history, watch reloads."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from clustermap.model import Node, Service
from clustermap.server.etcd_store import EtcdStore, parse_etcd_url
from tests.integration.etcd.harness import EtcdCluster, start_cluster
from tests.support.procs import wait_for

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    c = start_cluster(1)
    yield c
    c.close()


@pytest.fixture
def stores(etcd: EtcdCluster) -> Iterator[list[EtcdStore]]:
    prefix = f"/store-{next(_prefixes)}/"
    made: list[EtcdStore] = []

    def make() -> EtcdStore:
        s = EtcdStore(etcd.endpoints, prefix, log_size=100)
        s.start()
        made.append(s)
        return s

    yield [make(), make()]
    for s in made:
        s.close()


def svc(name: str, *ports: int) -> Service:
    return Service(name, tuple(Node("h", p) for p in sorted(ports)))


def test_parse_etcd_url() -> None:
    assert parse_etcd_url("etcd://a:1,b:2") == (["a:1", "b:2"], "/clustermap/")
    assert parse_etcd_url("etcd://[::1]:2379/x/y/") == (["::1:2379"], "/x/y/")
    for bad in ("http://a:1", "etcd://a", "etcd://a:x", "etcd://"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_etcd_url(bad)


def test_a_late_replica_computes_the_same_map_and_service_revisions(
    etcd: EtcdCluster, stores: list[EtcdStore]
) -> None:
    a, b = stores
    a.apply({"x": svc("x", 1, 2, 3), "y": svc("y", 1)})
    rev = a.apply({"x": svc("x", 1, 3)})  # a removal: x's revision is its keys' newest
    assert b.catch_up(rev)
    late = EtcdStore(etcd.endpoints, a.prefix)
    late.start()
    try:
        assert late.epoch == a.epoch == b.epoch
        for s in (a, b, late):
            assert [(n, st) for n, st in s.items()] == list(a.items())
            assert s.checksum == a.checksum
    finally:
        late.close()


def test_history_answers_older_revisions_until_compacted(
    etcd: EtcdCluster, stores: list[EtcdStore]
) -> None:
    a, _ = stores
    r1 = a.apply({"x": svc("x", 1), "y": svc("y", 1)})
    r2 = a.apply({"x": svc("x", 1, 2)})
    late = EtcdStore(etcd.endpoints, a.prefix)
    late.start()
    try:
        assert late.floor >= r2
        assert late.changes_since(r1) is None  # not prepared: the registry prepares it first
        late.prepare_history(r1)
        assert late.changes_since(r1) == {"x"}
        a.apply({"y": None})
        assert late.catch_up(a.revision)
        assert late.changes_since(r1) == {"x", "y"}  # history + this replica's own log
        a.compact()
        late.prepare_history(r1 - 1)
        assert late.changes_since(r1 - 1) is None
    finally:
        late.close()


def test_a_watch_cancelled_by_compaction_reloads_the_prefix(stores: list[EtcdStore]) -> None:
    a, b = stores
    a.apply({"x": svc("x", 1)})
    assert b.catch_up(a.revision)
    before = b.revision
    with b._cond:  # hold b's watch thread while its stream breaks and history moves on
        b._call.cancel()
        a.apply({"x": svc("x", 1, 2), "y": svc("y", 1)})
        a.apply({"x": None})
        a.compact()
    wait_for(lambda: b.reloads == 1, 30, "b to reload after compaction")
    assert b.catch_up(a.revision)
    assert list(b.items()) == list(a.items())
    assert b.floor > before
    assert b.changes_since(before) is None
