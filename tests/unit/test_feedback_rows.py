"""The feedback files: layout round trips, and the sidecar's reader against hostile rows.

Rows are written by workers, so everything in them is untrusted: the parser and the sweep must
never raise, never count a load below zero or above the clamp, and ignore a garbage row.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clustermap.feedback import layout as L
from clustermap.feedback.ofd import try_lock
from clustermap.model import Node, Service
from clustermap.sidecar.feedback import FeedbackHub
from clustermap.sidecar.outlier import OutlierPolicy

ENTRIES = 4
ROW = L.ROW_HEADER + 8 * L.ENTRY_WORDS * ENTRIES
EMPTY = (0, 0.0, 0.0, 0, 0)


def entry(
    node_id: int, in_flight: int = 0, ok: int = 0, failed: int = 0, latency: float = 0.0
) -> tuple[int | float, ...]:
    """The five words of an entry (streak: ``failed`` failures since the last success)."""
    calls = float(in_flight | ok << L.OK_SHIFT)
    return (node_id + 1, calls, latency, failed, (ok & 0xFFFF_FFFF) << 32 | failed)


def row_bytes(owner: int, entries: list[tuple[int | float, ...]]) -> bytes:
    out = struct.pack("<8Q", owner, *[0] * 7)
    for e in [*entries, *[EMPTY] * (ENTRIES - len(entries))]:
        out += struct.pack("<QddQQ", *e)
    return out


def test_headers_round_trip_and_refuse_garbage() -> None:
    raw = L.encode_feedback_header(8, ENTRIES, 7)
    head = L.parse_feedback_header(raw, L.feedback_size(8, ENTRIES))
    assert (head.rows, head.entries, head.row_size) == (8, ENTRIES, ROW)
    with pytest.raises(L.LayoutError, match="truncated"):
        L.parse_feedback_header(raw, L.feedback_size(8, ENTRIES) - 1)
    with pytest.raises(L.LayoutError, match="magic"):
        L.parse_feedback_header(b"X" + raw[1:], 1 << 20)
    load = L.encode_load_header(100, 9)
    assert L.parse_load_header(load, L.load_size(100)).capacity == 100
    with pytest.raises(L.LayoutError):
        L.parse_load_header(load, L.load_size(99))


def test_parse_row_keeps_valid_entries_and_rejects_the_rest() -> None:
    broken = (1 + 4, float(7 << L.OK_SHIFT), 0.25, 2, 6 << 32 | 2)  # a streak of 6 oks
    raw = row_bytes(
        5,
        [
            entry(3, in_flight=2, ok=10, failed=1),  # node 3: 1 failure since its 10th success
            entry(3, 9, 9, 9),  # node 3 again: rejected
            broken,  # a streak that began at success 6, but there have been 7: broken
            entry(500, 1, 1, 1),  # beyond capacity: rejected
        ],
    )
    owner, entries, rejected = L.parse_row(raw, ENTRIES, 100)
    assert owner == 5
    assert rejected == 2
    assert entries == [L.Entry(3, 2, 10, 1, 1, 0.0), L.Entry(4, 0, 7, 2, 0, 0.25)]


@pytest.mark.parametrize(
    ("calls", "latency"),
    [
        (float("nan"), 0.0),
        (-1.0, 0.0),
        (0.5, 0.0),
        (float(1 << 53), 0.0),
        (float("inf"), 0.0),
        (1.0, float("nan")),
        (1.0, -0.001),
        (1.0, float("inf")),
    ],
)
def test_parse_row_rejects_float_words_no_worker_writes(calls: float, latency: float) -> None:
    raw = row_bytes(5, [(1, calls, latency, 0, 0), entry(1, 1)])
    _, entries, rejected = L.parse_row(raw, ENTRIES, 100)
    assert (rejected, [e.node_id for e in entries]) == (1, [1])


def test_successes_wrap_with_the_calls_word() -> None:
    """The writer subtracts 2**52 at the wrap: the successes field goes on modulo 2**36."""
    calls = L.CALLS_WRAP - L.OK_ONE + 3  # 3 in flight, the last success before the wrap
    assert L.successes(calls) == L.OK_MASK
    after = calls + L.OK_DONE - L.CALLS_WRAP
    assert L.successes(after) == 0
    assert int(after) & L.IN_FLIGHT_MASK == 2


@given(st.binary(min_size=ROW, max_size=ROW), st.integers(1, 1 << 24))
def test_parse_row_never_raises_on_any_bytes(raw: bytes, capacity: int) -> None:
    _, entries, rejected = L.parse_row(raw, ENTRIES, capacity)
    ids = [e.node_id for e in entries]
    assert len(ids) == len(set(ids))
    assert all(0 <= i < capacity for i in ids)
    assert all(0 <= e.in_flight <= L.MAX_IN_FLIGHT for e in entries)
    assert len(entries) + rejected <= ENTRIES


def test_parse_row_refuses_a_short_row() -> None:
    with pytest.raises(L.LayoutError):
        L.parse_row(b"\0" * (ROW - 1), ENTRIES, 10)


# -- the sidecar's sweep over real files ------------------------------------------------------


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FeedbackHub]:
    h = FeedbackHub(
        str(tmp_path / "r.region"),
        rows=4,
        entries=ENTRIES,
        capacity=16,
        mode=0o660,
        group=None,
        policy=OutlierPolicy(),
    )
    h.decorate(Service("api", (Node("10.0.0.1", 80), Node("10.0.0.2", 80))))
    yield h
    h.close()


def write_row(hub: FeedbackHub, fd: int, row: int, data: bytes) -> None:
    off = L.HEADER_SIZE + row * hub.header.row_size
    os.pwrite(fd, data[: hub.header.row_size].ljust(hub.header.row_size, b"\0"), off)


def load_of(hub: FeedbackHub, node_id: int) -> int:
    return int(hub.load[L.HEADER_SIZE // 8 + node_id])


def test_sweep_counts_live_rows_only_and_forgets_released_ones(hub: FeedbackHub) -> None:
    hub.sweep()  # the first sweep takes the rows as they are as a baseline
    holder = os.open(hub.rows_path, os.O_RDWR)  # another open file description: a "worker"
    try:
        assert try_lock(holder, L.HEADER_SIZE, hub.header.row_size)
        write_row(hub, holder, 0, row_bytes(1 << 32 | 7, [entry(0, in_flight=3)]))
        # Row 1 has content but nobody holds it: a dead worker's, not counted.
        write_row(hub, holder, 1, row_bytes(1 << 32 | 8, [entry(0, in_flight=50)]))
        hub.sweep()
        assert load_of(hub, 0) == 3
        assert hub.rows_in_use == 1
    finally:
        os.close(holder)  # the worker dies: its lock goes, its calls stop counting
    hub.sweep()
    assert load_of(hub, 0) == 0
    assert hub.rows_in_use == 0


def test_a_row_going_backwards_is_ignored_until_its_owner_changes(hub: FeedbackHub) -> None:
    hub.sweep()
    holder = os.open(hub.rows_path, os.O_RDWR)
    try:
        assert try_lock(holder, L.HEADER_SIZE, hub.header.row_size)
        write_row(hub, holder, 0, row_bytes(1 << 32 | 7, [entry(0, 2, failed=10)]))
        hub.sweep()
        assert load_of(hub, 0) == 2
        write_row(hub, holder, 0, row_bytes(1 << 32 | 7, [entry(0, 2, failed=3)]))
        hub.sweep()
        assert hub.garbage == 1
        assert load_of(hub, 0) == 0  # its load no longer counts
        write_row(hub, holder, 0, row_bytes(2 << 32 | 7, [entry(0, 1)]))
        hub.sweep()
        assert load_of(hub, 0) == 1  # a new owner starts clean
    finally:
        os.close(holder)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(min_size=0, max_size=ROW + 8), min_size=1, max_size=8))
def test_sweep_survives_any_row_content(hub: FeedbackHub, rows: list[bytes]) -> None:
    holder = os.open(hub.rows_path, os.O_RDWR)
    try:
        for r in range(hub.header.rows):
            try_lock(holder, L.HEADER_SIZE + r * hub.header.row_size, hub.header.row_size)
        for k, data in enumerate(rows):
            write_row(hub, holder, k % hub.header.rows, data)
            hub.sweep()
        for i in range(hub.capacity):
            assert 0 <= load_of(hub, i) <= L.MAX_IN_FLIGHT * hub.header.rows
    finally:
        os.close(holder)
    hub.sweep()
    assert all(load_of(hub, i) == 0 for i in range(hub.capacity))


def test_files_are_created_private_to_the_group_and_kept_across_restarts(
    tmp_path: Path, hub: FeedbackHub
) -> None:
    st_rows = os.stat(hub.rows_path)
    assert st_rows.st_mode & 0o777 == 0o660
    assert os.stat(hub.load_path).st_mode & 0o777 == 0o644
    again = FeedbackHub(
        str(tmp_path / "r.region"),
        rows=4,
        entries=ENTRIES,
        capacity=16,
        mode=0o660,
        group=None,
        policy=OutlierPolicy(),
    )
    try:
        assert os.stat(again.rows_path).st_ino == st_rows.st_ino  # workers keep their rows
    finally:
        again.close()


def test_latency_is_measured_from_the_calls_in_flight(hub: FeedbackHub) -> None:
    """A worker reads no clock: 4 calls seen in flight by 10 sweeps 20 ms apart, then 8 done
    (4 of them too quick to be seen), is 0.8 s of busy time for 8 calls: 100 ms each."""
    base = L.HEADER_SIZE // 8 + hub.capacity
    hub.sweep(now=100.0)
    holder = os.open(hub.rows_path, os.O_RDWR)
    try:
        assert try_lock(holder, L.HEADER_SIZE, hub.header.row_size)
        write_row(hub, holder, 0, row_bytes(1 << 32 | 7, [entry(0, in_flight=4)]))
        for k in range(1, 11):
            hub.sweep(now=100.0 + 0.02 * k)
            assert int(hub.load[base]) == 1  # no latency yet: nothing has finished
        write_row(hub, holder, 0, row_bytes(1 << 32 | 7, [entry(0, ok=8)]))
        hub.sweep(now=100.22)
        assert int(hub.load[base]) == 100_000  # µs
        assert int(hub.load[base + hub.capacity]) == 100_000  # the cost: (0 in flight + 1) x
    finally:
        os.close(holder)


class _LookupsOnly(dict[str, Service]):
    """A published map that fails if walked: retain must cost what changed, not the map."""

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("retain walked the whole published map")

    def keys(self) -> Any:
        raise AssertionError("retain walked the whole published map")

    def values(self) -> Any:
        raise AssertionError("retain walked the whole published map")

    def items(self) -> Any:
        raise AssertionError("retain walked the whole published map")


def test_retain_forgets_only_the_nodes_a_change_removed(hub: FeedbackHub) -> None:
    api = Service("api", (Node("10.0.0.1", 80), Node("10.0.0.2", 80)))
    web = hub.decorate(Service("web", (Node("10.0.1.1", 80),)))
    assert web.overlay is not None
    kept, gone = (hub.ids.ids[("api", "10.0.0.1", 80)], hub.ids.ids[("api", "10.0.0.2", 80)])
    smaller = Service("api", (Node("10.0.0.1", 80),))
    hub.decorate(smaller)
    hub.retain([api], _LookupsOnly(api=smaller, web=web))
    assert ("api", "10.0.0.2", 80) not in hub.ids.ids
    assert hub.ids.ids[("api", "10.0.0.1", 80)] == kept
    assert hub.ids.ids[("web", "10.0.1.1", 80)] == web.overlay.ids[0]
    # the freed id rests: a node added now gets another one
    grown = hub.decorate(Service("api", (Node("10.0.0.1", 80), Node("10.0.0.3", 80))))
    assert grown.overlay is not None
    assert gone not in grown.overlay.ids
    hub.retain([smaller], _LookupsOnly(api=grown, web=web))
    # a removed service: every node of it goes
    hub.retain([web], _LookupsOnly(api=grown))
    assert ("web", "10.0.1.1", 80) not in hub.ids.ids
    assert set(hub.ids.ids) == {("api", "10.0.0.1", 80), ("api", "10.0.0.3", 80)}
