"""The storage contract every :class:`~clustermap.server.store.MapStore` meets, run against the
in-memory store and the etcd store (a real single-member etcd; skipped if etcd is missing)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import pytest

from clustermap.checksum import map_checksum, service_digest
from clustermap.model import Node, Service
from clustermap.server.store import MapStore, MemoryStore
from tests.integration.etcd.harness import EtcdCluster, start_cluster

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    c = start_cluster(1)
    yield c
    c.close()


@pytest.fixture(params=["memory", "etcd"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryStore(log_size=100)
        return
    from clustermap.server.etcd_store import EtcdStore

    cluster = request.getfixturevalue("etcd")
    s = EtcdStore(cluster.endpoints, f"/contract-{next(_prefixes)}/", log_size=100)
    s.start()
    yield s
    s.close()


def svc(name: str, *ports: int, **kw: Any) -> Service:
    return Service(name, tuple(Node("h", p) for p in sorted(ports)), **kw)


def content(s: Service) -> tuple[object, ...]:
    return (s.name, s.nodes, s.strategy, s.panic_threshold, dict(s.meta))


def test_new_store_is_empty(store: MapStore) -> None:
    assert store.epoch
    assert list(store.items()) == []
    assert store.checksum == 0
    assert store.get("a") is None
    assert store.changes_since(store.revision) == frozenset()


def test_apply_bumps_the_revision_and_stores_values(store: MapStore) -> None:
    before = store.revision
    value = Service(
        "a",
        (
            Node("10.0.0.1", 80, weight=3, status="drain", meta=MappingProxyType({"z": "1"})),
            Node("h", 1),
        ),
        strategy="weighted",
        panic_threshold=0.5,
        meta=MappingProxyType({"team": "x"}),
    )
    rev = store.apply({"a": value})
    assert rev > before
    assert store.revision == rev
    stored = store.get("a")
    assert stored is not None
    assert content(stored.service) == content(value)
    assert stored.service.revision == rev
    assert stored.digest == service_digest(value)
    assert store.checksum == map_checksum([stored.digest])


def test_no_op_writes_keep_the_revision(store: MapStore) -> None:
    rev = store.apply({"a": svc("a", 1, 2)})
    assert store.apply({"a": svc("a", 1, 2)}) == rev
    assert store.apply({"b": None}) == rev
    assert store.apply({}) == rev
    assert store.revision == rev


def test_one_apply_is_one_revision(store: MapStore) -> None:
    rev = store.apply({"a": svc("a", 1), "b": svc("b", 1), "c": svc("c", 1)})
    assert {s.service.revision for _, s in store.items()} == {rev}
    assert [n for n, _ in store.items()] == ["a", "b", "c"]
    rev2 = store.apply({"a": None, "b": svc("b", 1, 2)})
    assert rev2 > rev
    assert store.get("a") is None
    b = store.get("b")
    assert b is not None
    assert b.service.revision == rev2
    assert [n for n, _ in store.items()] == ["b", "c"]
    assert store.checksum == map_checksum(s.digest for _, s in store.items())


def test_changes_since(store: MapStore) -> None:
    r1 = store.apply({"a": svc("a", 1), "b": svc("b", 1)})
    r2 = store.apply({"a": svc("a", 1, 2)})
    r3 = store.apply({"b": None, "c": svc("c", 1)})
    assert store.changes_since(r3) == frozenset()
    assert store.changes_since(r2) == {"b", "c"}
    assert store.changes_since(r1) == {"a", "b", "c"}
    assert store.changes_since(r3 + 1000) is None


def test_removing_every_node_removes_the_service(store: MapStore) -> None:
    store.apply({"a": svc("a", 1, 2, 3)})
    store.apply({"a": svc("a", 2)})
    a = store.get("a")
    assert a is not None
    assert [n.port for n in a.service.nodes] == [2]
    store.apply({"a": None})
    assert store.get("a") is None
    assert store.checksum == 0


def test_name_mismatch_is_refused(store: MapStore) -> None:
    with pytest.raises(ValueError, match="written under the name"):
        store.apply({"a": svc("b", 1)})


def test_concurrent_writers_lose_nothing(store: MapStore) -> None:
    lock = threading.Lock()  # the MemoryStore's owner serialises; etcd guards each write

    def write(i: int) -> None:
        with lock if isinstance(store, MemoryStore) else _nolock():
            store.apply({f"s{i}": svc(f"s{i}", i + 1)})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [n for n, _ in store.items()] == sorted(f"s{i}" for i in range(8))


class _nolock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_snapshot_and_len_agree_with_items(store: MapStore) -> None:
    assert len(store) == 0
    assert store.snapshot() == []
    store.apply({n: Service(n, (Node("h", 1),)) for n in ("c", "a", "b")})
    store.apply({"b": None})
    assert len(store) == 2
    snap = store.snapshot()
    assert sorted(s.service.name for s in snap) == ["a", "c"]
    assert sorted(snap, key=lambda s: s.service.name) == [s for _, s in store.items()]
