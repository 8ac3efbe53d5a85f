"""Maglev tables of declared subsets (meta ``subset_keys``): the writer publishes one per
declared subset of a hashed service, equal to what a worker would build; workers find theirs
by nodes digest and index it in place; undeclared subsets and subsets over the limits are built
by the worker, as before (docs/routing.md, docs/region-format.md)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import clustermap
from clustermap.balance import build_maglev, canonical_name
from clustermap.balance.hashing import maglev_digest
from clustermap.balance.picker import eligible_nodes
from clustermap.balance.routing import declared_subsets, subset_service
from clustermap.model import DOWN, Node, Service
from clustermap.region import layout as L
from clustermap.region.reader import RegionReader
from clustermap.region.tables import MAX_SUBSET_TABLES
from clustermap.region.writer import RegionWriter

KEYS = [f"user:{i}" for i in range(300)]


def tagged(count: int, keys: str = "version;tier,version", **options: object) -> Service:
    """``count`` nodes of versions v0-v2 and tiers gold/std (weights 1-3), hashed, with the
    given ``subset_keys``."""
    nodes = tuple(
        Node(
            f"10.2.{i // 250}.{i % 250}",
            8080,
            weight=1 + i % 3,
            meta={"version": f"v{i % 3}", "tier": "gold" if i % 4 == 0 else "std"},
        )
        for i in range(count)
    )
    meta = {"subset_keys": keys} if keys else {}
    meta.update(options.pop("meta", {}))  # type: ignore[call-overload]
    return Service("h", nodes, "consistent_hash", meta=meta, **options)  # type: ignore[arg-type]


def reference(service: Service) -> list[int]:
    nodes = eligible_nodes(service)
    return build_maglev([canonical_name(n) for n in nodes], [n.weight for n in nodes])


def published(reader: RegionReader, service: Service) -> list[int] | None:
    """The table the region holds for ``service``'s eligible nodes, found as a worker does."""
    slot, version, _ = reader.lookup("h")
    nodes = eligible_nodes(service)
    digest = maglev_digest([canonical_name(n) for n in nodes], [n.weight for n in nodes])
    found = reader.maglev_table(slot, version, len(nodes), digest)
    return None if found is None else list(found[0])


@pytest.mark.parametrize("count", [10, 100, 300])
def test_every_declared_subset_gets_the_table_a_worker_would_build(
    region_path: Path, count: int
) -> None:
    service = tagged(count)
    subsets = declared_subsets(service)
    assert subsets[:3] == [(("version", "v0"),), (("version", "v1"),), (("version", "v2"),)]
    assert len(subsets) == 3 + 6  # version; then tier x version combinations
    with RegionWriter(region_path) as w:
        w.publish([service])
    reader = RegionReader(region_path)
    assert published(reader, service) == reference(service)  # the whole table, still first
    for pairs in subsets:
        assert published(reader, subset_service(service, pairs)) == reference(
            subset_service(service, pairs)
        ), pairs
    cm = clustermap.open(region_path)
    for pairs in subsets:
        subset = dict(pairs)
        sub = subset_service(service, pairs)
        local = clustermap.balance.ServicePicker(sub)
        want = [local.pick(key=k).address for k in KEYS]
        assert [cm.pick("h", k, subset=subset).address for k in KEYS] == want
        picker = cm.picker("h", subset)
        assert picker.maglev_shared, pairs  # no worker build: the region's pages
        assert isinstance(picker.maglev, memoryview)


def test_an_undeclared_subset_is_built_by_the_worker(region_path: Path) -> None:
    service = tagged(30, keys="version")
    with RegionWriter(region_path) as w:
        w.publish([service])
    cm = clustermap.open(region_path)
    subset = {"tier": "gold"}
    sub = subset_service(service, (("tier", "gold"),))
    local = clustermap.balance.ServicePicker(sub)
    assert [cm.pick("h", k, subset=subset).address for k in KEYS] == [
        local.pick(key=k).address for k in KEYS
    ]
    assert not cm.picker("h", subset).maglev_shared
    cm.pick("h", "k", subset={"version": "v1"})
    assert cm.picker("h", {"version": "v1"}).maglev_shared


def test_subsets_with_the_same_nodes_share_one_table_and_down_nodes_are_left_out(
    region_path: Path,
) -> None:
    nodes = tuple(
        Node(f"10.3.0.{i}", 80, status=DOWN if i == 3 else "up", meta={"a": "x", "b": str(i % 2)})
        for i in range(4)
    )
    # {a=x} has every node: the whole table serves it; {b=1} has nodes 1 and 3, 3 is down.
    service = Service("h", nodes, "consistent_hash", meta={"subset_keys": "a;b"})
    with RegionWriter(region_path) as w:
        w.publish([service])
    reader = RegionReader(region_path)
    slot, version, _ = reader.lookup("h")
    off = int(reader.words[(L.HEADER_SIZE + slot * L.SLOT_SIZE) // 8 + 1])
    records = L.table_records(reader._view, off, version, reader._size)
    assert len(records) == 3  # whole, {b=0}, {b=1}
    cm = clustermap.open(region_path)
    assert {cm.pick("h", k, subset={"b": "1"}).address for k in KEYS} == {"10.3.0.1:80"}
    assert cm.picker("h", {"b": "1"}).maglev_shared
    cm.pick("h", "k", subset={"a": "x"})
    assert cm.picker("h", {"a": "x"}).maglev_shared


def test_the_default_subset_of_the_fallback_gets_a_table(region_path: Path) -> None:
    meta = {"subset_fallback": "default", "subset_default": "version=v1"}
    service = tagged(12, keys="", meta=meta)
    assert declared_subsets(service) == [(("version", "v1"),)]
    with RegionWriter(region_path) as w:
        w.publish([service])
    cm = clustermap.open(region_path)
    node = cm.pick("h", "user:1", subset={"version": "v9"})  # falls back to version=v1
    assert node.meta["version"] == "v1"
    assert cm.picker("h", {"version": "v9"}).maglev_shared


def test_tables_over_the_per_service_limit_are_left_to_workers_and_logged(
    region_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = tuple(Node(f"10.4.0.{i}", 80, meta={"shard": f"s{i:02d}"}) for i in range(40))
    service = Service("h", nodes, "consistent_hash", meta={"subset_keys": "shard"})
    caplog.set_level(logging.WARNING, logger="clustermap.region")
    with RegionWriter(region_path) as w:
        w.publish([service])
        assert w.tables_capped == 1
        w.publish([service])  # the same again: logged once
        fewer = Service("h", nodes[:10], "consistent_hash", meta=service.meta, revision=2)
        w.publish([fewer])
        assert w.tables_capped == 0
        w.publish([service])  # over the limit again: logged again
    lines = [r.getMessage() for r in caplog.records if "no published table" in r.getMessage()]
    assert len(lines) == 2
    assert f"'h': {40 - MAX_SUBSET_TABLES} declared subsets get no published table" in lines[0]
    cm = clustermap.open(region_path)
    cm.pick("h", "k", subset={"shard": "s00"})
    assert cm.picker("h", {"shard": "s00"}).maglev_shared  # within the limit, declared order
    last = {"shard": f"s{len(nodes) - 1:02d}"}
    assert cm.pick("h", "k", subset=last).address == "10.4.0.39:80"
    assert not cm.picker("h", last).maglev_shared  # over it: the worker built its own


def test_only_changed_tables_are_rebuilt_and_a_new_writer_keeps_them(
    region_path: Path, table_builds: list[int]
) -> None:
    service = tagged(30, keys="version")
    with RegionWriter(region_path) as w:
        w.publish([service])
        assert len(table_builds) == 4  # whole + v0, v1, v2
        changed = service.nodes[1]._replace(weight=7)  # a v1 node
        nodes = (service.nodes[0], changed, *service.nodes[2:])
        again = Service("h", nodes, "consistent_hash", meta=service.meta)
        w.publish([again])
        assert len(table_builds) == 6  # whole and v1 only; v0 and v2 copied
    with RegionWriter(region_path) as w:  # a restarted sidecar takes the tables back
        w.publish([Service("h", nodes, "consistent_hash", meta=service.meta, revision=5)])
        assert len(table_builds) == 6
    reader = RegionReader(region_path)
    for pairs in declared_subsets(again):
        sub = subset_service(again, pairs)
        assert published(reader, sub) == reference(sub)
