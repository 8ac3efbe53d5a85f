"""Maglev tables published with hashed services: what the writer attaches, what readers and
workers find, and every way a table can be missing, stale or damaged (workers then build their
own, never pick wrongly)."""

from __future__ import annotations

import hashlib
import os
import time
from array import array
from dataclasses import replace
from pathlib import Path

import pytest

import clustermap
from clustermap.balance import MAGLEV_TABLE_SIZE, build_maglev, canonical_name
from clustermap.balance.picker import eligible_nodes
from clustermap.model import Ejection, Node, Overlay, Service
from clustermap.region import layout as L
from clustermap.region import writer as writer_module
from clustermap.region.reader import RegionReader
from clustermap.region.writer import RegionWriter
from tests.unit.test_balance_docs import VECTORS, node_of

KEYS = [f"user:{i}" for i in range(300)]


def hashed(name: str, count: int, **options: object) -> Service:
    nodes = tuple(Node(f"10.1.{i // 250}.{i % 250}", 8080, weight=1 + i % 3) for i in range(count))
    options.setdefault("strategy", "consistent_hash")
    return Service(name, nodes, **options)  # type: ignore[arg-type]


def expected_table(service: Service) -> list[int]:
    nodes = eligible_nodes(service)
    return build_maglev([canonical_name(n) for n in nodes], [n.weight for n in nodes])


def slot_version(reader: RegionReader, name: str) -> tuple[int, int]:
    slot, version, _ = reader.lookup(name)
    return slot, version


def table_of(reader: RegionReader, name: str) -> list[int] | None:
    found = reader.maglev_table(*slot_version(reader, name))
    return None if found is None else list(found[0])


def local_picks(service: Service) -> list[str]:
    """What a worker that builds its own table picks (the reference)."""
    picker = clustermap.balance.ServicePicker(service)
    return [picker.pick(key=k).address for k in KEYS]


@pytest.mark.parametrize("count", [1, 5, 100, 300])
def test_hashed_services_get_their_table_and_workers_index_it(
    region_path: Path, count: int
) -> None:
    service = hashed("h", count)
    with RegionWriter(region_path) as w:
        w.publish([service, Service("rr", service.nodes)])
    reader = RegionReader(region_path)
    assert table_of(reader, "h") == expected_table(service)
    assert table_of(reader, "rr") is None  # round-robin services get none
    cm = clustermap.open(region_path)
    assert [cm.pick("h", k).address for k in KEYS] == local_picks(service)
    picker = cm.picker("h")
    assert picker.maglev_shared
    assert isinstance(picker.maglev, memoryview)
    assert isinstance(picker.maglev.obj, type(reader._view.obj))  # the region's mmap: no copy
    assert picker.maglev.itemsize == (1 if count <= 256 else 2)
    cm.pick("rr", "user:1")
    assert not cm.picker("rr").maglev_shared  # built by the worker, as before


def test_str_bytes_and_mixed_keys_pick_the_same_nodes(region_path: Path) -> None:
    """The client's inlined keyed pick assumes a str key; bytes keys (and then any key) take
    the tested branch: every key type still picks what the spec says."""
    service = hashed("h", 20)
    with RegionWriter(region_path) as w:
        w.publish([service])
    want = local_picks(service)
    cm = clustermap.open(region_path)
    assert [cm.pick("h", k).address for k in KEYS] == want
    assert cm.picker("h").str_maglev is not None
    assert [cm.pick("h", k.encode()).address for k in KEYS] == want
    assert cm.picker("h").str_maglev is None  # a bytes key switched off the str branch
    assert cm.picker("h").bytes_maglev is not None  # ... and on the bytes one
    assert cm.pick("h", KEYS[0]).address == want[0]
    assert cm.picker("h").bytes_maglev is None  # mixed keys: the tested branch from now on
    mixed = [cm.pick("h", k if i % 2 else k.encode()).address for i, k in enumerate(KEYS)]
    assert mixed == want
    with pytest.raises(TypeError):
        cm.pick("h", 42)  # type: ignore[arg-type]


def test_meta_hash_maglev_opts_in_and_ketama_opts_out(region_path: Path) -> None:
    with RegionWriter(region_path) as w:
        w.publish(
            [
                hashed("opt-in", 8, strategy="round_robin", meta={"hash": "maglev"}),
                hashed("ketama", 8, meta={"hash": "ketama"}),
            ]
        )
    reader = RegionReader(region_path)
    assert table_of(reader, "opt-in") is not None
    assert table_of(reader, "ketama") is None


@pytest.mark.parametrize("name", ["maglev-a", "maglev-b"])
def test_published_table_equals_the_documented_vectors(region_path: Path, name: str) -> None:
    rows = VECTORS[name]
    service = Service(
        name, tuple(node_of(r[0], int(r[1])) for r in reversed(rows)), strategy="consistent_hash"
    )
    with RegionWriter(region_path) as w:
        w.publish([service])
    table = table_of(RegionReader(region_path), name)
    assert table is not None
    props = dict(VECTORS[f"{name}-table"])
    assert (
        hashlib.sha256(array("I", table).tobytes()).hexdigest()
        == props["sha256(table as u32 little-endian)"]
    )
    assert " ".join(map(str, table[:16])) == props["table[0..15]"]


def test_table_follows_changes_and_is_reused_when_nodes_are_unchanged(
    region_path: Path, table_builds: list[int]
) -> None:
    service = hashed("h", 20)
    with RegionWriter(region_path) as w:
        w.publish([service])
        reader = RegionReader(region_path)
        assert len(table_builds) == 1
        # Same eligible nodes, other content (a down node): republished, table copied.
        more = Service(
            "h", (*service.nodes, Node("10.9.9.9", 1, status="down")), strategy="consistent_hash"
        )
        w.publish([more])
        assert len(table_builds) == 1
        assert table_of(reader, "h") == expected_table(service)
        w.publish([more])  # unchanged: nothing written
        assert w.last_stats is not None
        assert w.last_stats.unchanged == 1
        fewer = Service("h", service.nodes[:-1], strategy="consistent_hash")
        w.publish([fewer])
        assert len(table_builds) == 2
        assert table_of(reader, "h") == expected_table(fewer)


def test_an_ejection_republishes_the_service_with_its_table_copied_not_used_by_workers(
    region_path: Path, table_builds: list[int]
) -> None:
    """Feedback republishes a service for its overlay alone: the table (over the nodes without
    ejections) is copied, and a worker with the node ejected builds its own until it returns."""
    service = hashed("h", 20)
    ids = Overlay(tuple(range(20)), ())
    shared = local_picks(service)
    gone = service.nodes[3].address
    with RegionWriter(region_path) as w:
        w.publish([replace(service, overlay=ids)])
        cm = clustermap.open(region_path)
        assert [cm.pick("h", k).address for k in KEYS] == shared
        assert cm.picker("h").maglev_shared
        for _ in range(2):  # an ejection, then its renewal: two overlay-only republishes
            until = time.time_ns() + 600 * 10**9
            w.publish([replace(service, overlay=replace(ids, ejected=(Ejection(3, until, "x"),)))])
            picks = [cm.pick("h", k).address for k in KEYS]
            assert gone not in picks
            assert not cm.picker("h").maglev_shared
            assert table_of(RegionReader(region_path), "h") == expected_table(service)
        w.publish([replace(service, overlay=ids)])  # the ejection ends
        assert [cm.pick("h", k).address for k in KEYS] == shared
        assert cm.picker("h").maglev_shared
        assert len(table_builds) == 1


def test_tables_survive_reopen_and_growth(
    region_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "TABLE_BUDGET_S", 60.0)  # every table in one update
    services = [hashed(f"h{i}", 10 + i) for i in range(3)]
    with RegionWriter(region_path) as w:
        w.publish(services)
    with RegionWriter(region_path) as w:  # re-derives its state from the file
        w.publish(services)
        assert w.last_stats is not None
        assert w.last_stats.unchanged == 3
        inode = os.stat(region_path).st_ino
        w.publish([Service(f"rr{i}", services[0].nodes) for i in range(200)])  # grows the file
        assert os.stat(region_path).st_ino != inode
    reader = RegionReader(region_path)
    for s in services:
        assert table_of(reader, s.name) == expected_table(s)


def test_over_budget_tables_follow_in_later_updates(
    region_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "TABLE_BUDGET_S", 0.0)  # one table per update
    services = [hashed(f"h{i}", 10) for i in range(4)]
    with RegionWriter(region_path) as w:
        w.publish(services)
        reader = RegionReader(region_path)
        assert w.tables_owed == 3
        assert sum(table_of(reader, s.name) is not None for s in services) == 1
        cm = clustermap.open(region_path)
        assert [cm.pick("h3", k).address for k in KEYS] == local_picks(services[3])  # builds
        w.touch()
        w.publish(meta=L.Meta(revision=2))
        assert w.tables_owed == 1
        w.publish([], ["h3"])  # removed: no longer owed
        assert w.tables_owed == 0
        for s in services[:3]:
            assert table_of(reader, s.name) == expected_table(s)


def test_a_damaged_table_is_ignored_and_the_worker_builds_its_own(region_path: Path) -> None:
    service = hashed("h", 12)
    with RegionWriter(region_path) as w:
        w.publish([service])
        reader = RegionReader(region_path)
        slot, version = slot_version(reader, "h")
        off = reader.words[(L.HEADER_SIZE + slot * L.SLOT_SIZE) // 8 + 1]
        payload_len = L.parse_record_header(reader._view[off : off + 24])[1]
        table_at = off + L.align(24 + payload_len)
        with open(region_path, "r+b") as f:  # flip one table entry behind the writer's back
            f.seek(table_at + 24 + 24 + 5)
            f.write(bytes([99]))
        assert reader.maglev_table(slot, version) is None  # the checksum no longer matches
        cm = clustermap.open(region_path)
        assert [cm.pick("h", k).address for k in KEYS] == local_picks(service)
        assert not cm.picker("h").maglev_shared


def test_a_table_of_other_nodes_is_never_used(region_path: Path) -> None:
    """A worker whose eligible set differs from the writer's (another rule, a newer client)
    compares digests and builds its own; an entry out of range is caught, never raised."""
    service = hashed("h", 12)
    with RegionWriter(region_path) as w:
        w.publish([service])
    reader = RegionReader(region_path)
    slot, version = slot_version(reader, "h")
    found = reader.maglev_table(slot, version)
    assert found is not None
    entries, count, digest = found
    other = Service("h", service.nodes[:6], strategy="consistent_hash")
    picker = clustermap.balance.ServicePicker(
        other, lambda *_: clustermap.balance.MaglevTable(entries, count, digest)
    )
    assert [picker.pick(key=k).address for k in KEYS] == local_picks(other)
    assert not picker.maglev_shared
    # Right digest and count claimed, wrong content: indexes past the nodes fall back.
    liar = clustermap.balance.ServicePicker(
        other,
        lambda *_: clustermap.balance.MaglevTable(
            bytes([200]) * MAGLEV_TABLE_SIZE, 6, _digest_of(other)
        ),
    )
    assert [liar.pick(key=k).address for k in KEYS] == local_picks(other)
    assert not liar.maglev_shared


def _digest_of(service: Service) -> int:
    from clustermap.balance.hashing import maglev_digest

    nodes = eligible_nodes(service)
    return maglev_digest([canonical_name(n) for n in nodes], [n.weight for n in nodes])


def test_replaced_table_space_is_not_reused_within_the_grace_period(region_path: Path) -> None:
    service = hashed("h", 12)
    with RegionWriter(region_path) as w:
        w.publish([service])
        reader = RegionReader(region_path)
        slot, version = slot_version(reader, "h")
        old = reader.maglev_table(slot, version)
        assert old is not None
        before = bytes(old[0])
        for i in range(5):  # other tables come and go; none may land on the old one
            w.publish([hashed("h", 13 + i), hashed(f"x{i}", 40)])
        assert bytes(old[0]) == before  # a worker still indexing the old view reads its table


def test_a_warm_picker_finds_its_table_after_the_file_moved_its_slot(
    region_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replacement file renumbers slots (sorted by name) but keeps versions, so the worker
    keeps its picker; the table is looked up by name when the first keyed pick wants it."""
    monkeypatch.setattr(writer_module, "TABLE_BUDGET_S", 60.0)
    service = hashed("h", 12)
    with RegionWriter(region_path) as w:
        w.publish([service])
        cm = clustermap.open(region_path)
        cm.pick("h")  # a warm picker, no table asked for yet
        picker = cm.picker("h")
        slot_before = slot_version(RegionReader(region_path), "h")[0]
        w.publish([Service(f"a{i:03d}", service.nodes) for i in range(200)])  # grows the file
    assert slot_version(RegionReader(region_path), "h")[0] != slot_before
    assert [cm.pick("h", k).address for k in KEYS] == local_picks(service)
    assert cm.picker("h") is picker
    assert picker.maglev_shared
