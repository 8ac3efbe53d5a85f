"""Registry bounds and lock discipline (issue 17, item 8): configured caps refuse with the limit
named, and no poll sorts or walks the whole map while it holds the registry's lock."""

from __future__ import annotations

import pytest

from clustermap.server.registry import DELTA, FULL, Exhausted, Registry, StoredService
from clustermap.server.store import MemoryStore
from clustermap.server.validation import Registration


class WatchedMap(dict[str, StoredService]):
    """The registry's services, recording which whole-map reads happen, and with the lock held."""

    registry: Registry
    whole_map_reads: list[tuple[str, bool]]

    def _note(self, kind: str) -> None:
        self.whole_map_reads.append((kind, self.registry._lock.locked()))

    def items(self):  # type: ignore[override]
        self._note("items")
        return super().items()

    def values(self):  # type: ignore[override]
        self._note("values")
        return super().values()

    def keys(self):  # type: ignore[override]
        self._note("keys")
        return super().keys()


def _registry(**kw: int) -> tuple[Registry, WatchedMap]:
    registry = Registry(MemoryStore(epoch="E"), warmup=0, **kw)  # type: ignore[arg-type]
    watched = WatchedMap()
    watched.registry, watched.whole_map_reads = registry, []
    registry._services = watched
    return registry, watched


def _reg(service: str, port: int = 80, **kw: object) -> Registration:
    return Registration(service=service, host="10.0.0.1", port=port, **kw)  # type: ignore[arg-type]


def test_service_cap_names_the_limit() -> None:
    registry, _ = _registry(max_services=3)
    for i in range(3):
        registry.register(_reg(f"s{i}"))
    registry.register(_reg("s0", port=81))  # an existing service still takes nodes
    with pytest.raises(Exhausted, match=r"at most 3 services \(--max-services\)"):
        registry.register(_reg("s3"))


def test_node_cap_names_the_limit() -> None:
    registry, _ = _registry(max_nodes=2)
    registry.register(_reg("a", 1))
    registry.register(_reg("a", 2))
    registry.register(_reg("a", 2, weight=5))  # re-registering a node is not a new node
    with pytest.raises(Exhausted, match=r"at most 2 nodes \(--max-nodes-per-service\)"):
        registry.register(_reg("a", 3))
    registry.register(_reg("b", 3))  # other services are not affected


def test_filtered_polls_never_read_the_whole_map() -> None:
    registry, store = _registry()
    for i in range(200):
        registry.register(_reg(f"s{i:03}"))
    names = frozenset(f"s{i:03}" for i in range(0, 200, 7)) | {"missing"}
    full = registry.poll("", 0, names)
    assert full.kind == FULL
    assert [s.service.name for s in full.services] == sorted(names - {"missing"})
    registry.register(_reg("s007", 81))
    registry.register(_reg("s008", 81))
    delta = registry.poll(full.epoch, full.revision, names)
    assert delta.kind == DELTA
    assert [s.service.name for s in delta.services] == ["s007"]
    assert store.whole_map_reads == []


def test_full_polls_copy_the_map_once_per_revision_and_sort_outside_the_lock() -> None:
    registry, store = _registry()
    for i in range(50, 0, -1):
        registry.register(_reg(f"s{i:02}"))
    first = registry.poll("", 0)
    again = registry.poll("", 0)
    assert [s.service.name for s in first.services] == [f"s{i:02}" for i in range(1, 51)]
    assert again.services is first.services
    assert store.whole_map_reads == [("values", True)]  # one reference copy, nothing sorted
    registry.services()
    registry.status()
    assert all(kind == "values" for kind, _ in store.whole_map_reads)
