"""Ejections and least_request in the picker (pure): what a worker does with the overlay."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

import pytest

from clustermap.balance.hashing import MAGLEV_TABLE_SIZE
from clustermap.balance.picker import ExpiringPicker, MaglevTable, ServicePicker, make_picker
from clustermap.errors import CorruptRegion
from clustermap.model import Ejection, Node, Overlay, Service
from clustermap.region import layout as L
from clustermap.region.tables import build_table, table_input

NODES = tuple(Node("10.0.0.1", 80 + i) for i in range(4))


def service(*ejected: tuple[int, float], panic: float = 0.0) -> Service:
    now = time.time_ns()
    return Service(
        "api",
        NODES,
        panic_threshold=panic,
        overlay=Overlay(
            tuple(range(10, 14)),
            tuple(Ejection(p, now + int(s * 1e9), "5 consecutive failures") for p, s in ejected),
        ),
    )


def ports(picker: ServicePicker, n: int = 200, **kw: str) -> set[int]:
    return {picker.pick(**kw).port for _ in range(n)}


def test_the_overlay_round_trips_through_the_record_and_old_records_still_decode() -> None:
    s = service((1, 30))
    back = L.decode_service(L.encode_service(s))
    assert back == s
    assert back.overlay == s.overlay
    plain = Service("api", NODES)
    assert L.decode_service(L.encode_service(plain)).overlay is None
    with pytest.raises(CorruptRegion):  # an overlay that does not fit its nodes
        L.decode_service(L.encode_service(Service("api", NODES, overlay=Overlay((1,), ()))))


def test_ejected_nodes_get_no_picks_by_any_strategy() -> None:
    p = make_picker(service((1, 30)))
    assert isinstance(p, ExpiringPicker)
    for strategy in ("round_robin", "random", "weighted", "least_request"):
        assert 81 not in ports(p, strategy=strategy), strategy
    assert p.pick() is not None
    assert all(p.pick(key=f"k{i}").port != 81 for i in range(200))
    assert make_picker(Service("api", NODES)).__class__ is ServicePicker


def test_an_ejection_that_would_empty_the_service_is_ignored_and_panic_still_applies() -> None:
    everything = service((0, 30), (1, 30), (2, 30), (3, 30))
    assert ports(make_picker(everything)) == {80, 81, 82, 83}
    # Panic threshold 0.6: 2 of 4 left healthy (50 %) is too few, so picks spread over all.
    assert ports(make_picker(service((0, 30), (1, 30), panic=0.6))) == {80, 81, 82, 83}
    assert ports(make_picker(service((0, 30), (1, 30), panic=0.4))) == {82, 83}


def test_ejections_expire_on_the_workers_clock_without_a_sidecar() -> None:
    p = make_picker(service((1, 0.2)))
    assert 81 not in ports(p)
    time.sleep(0.25)  # the ejection's own deadline, not a synchronisation
    assert 81 in ports(p)
    assert 81 in {p.pick(key=f"k{i}").port for i in range(400)}
    # An ejection absurdly far in the future is garbage, not a verdict.
    assert 81 in ports(make_picker(service((1, 10 * 24 * 3600))))


def wait_past(seconds_from_now: float) -> None:
    """Wait until the wall clock has passed an ejection's own deadline."""
    until = time.time_ns() + int(seconds_from_now * 1e9)
    while time.time_ns() <= until:
        time.sleep(0.01)


def test_the_clients_iterators_expire_ejections_for_every_strategy() -> None:
    """The client picks through ``next(picker.default_it)`` and ``next(picker.iters[name])``:
    those, and an iterator taken before the expiry, must check the clock too."""
    p = make_picker(service((1, 1.0)))  # long enough for a loaded machine
    assert p.maglev is None  # keyed picks cannot go through the client's inlined lookup
    held = dict(p.iters)
    for name in ("round_robin", "random", "weighted", "weighted_random"):
        assert 81 not in {next(p.iters[name]).port for _ in range(200)}, name
    assert 81 not in {next(p.default_it).port for _ in range(200)}
    wait_past(1.0)
    assert 81 in {next(p.default_it).port for _ in range(400)}
    for name in ("round_robin", "random", "weighted", "weighted_random"):
        assert 81 in {next(p.iters[name]).port for _ in range(400)}, name
        assert 81 in {next(held[name]).port for _ in range(400)}, name


def test_a_published_table_is_not_used_while_nodes_are_ejected() -> None:
    """The sidecar's table is built over the nodes without ejections: a picker with ejections
    must not index it (its digest differs) and builds its own; once they expire it uses it."""
    plain = Service("api", NODES, strategy="consistent_hash")
    given = table_input(plain)
    assert given is not None
    entries, width, count, digest = L.decode_table(build_table(given))
    published = MaglevTable(memoryview(entries).cast("B" if width == 1 else "H"), count, digest)
    calls = []

    def source(nodes: int, digest: int) -> MaglevTable:
        calls.append(1)
        return published

    shared = make_picker(plain, source)
    keys = [f"k{i}" for i in range(2000)]
    assert [shared.pick(key=k).port for k in keys[:1]]
    assert shared.maglev_shared
    owners = {k: shared.pick(key=k).port for k in keys}
    assert 81 in owners.values()

    ejected = Service(
        "api",
        NODES,
        strategy="consistent_hash",
        overlay=Overlay(tuple(range(10, 14)), (Ejection(1, time.time_ns() + 1_000_000_000, "x"),)),
    )
    p = make_picker(ejected, source)
    assert isinstance(p, ExpiringPicker)
    moved = {k: p.pick(key=k).port for k in keys}
    assert calls
    assert not p.maglev_shared
    assert p.maglev is None
    assert 81 not in moved.values()
    # Maglev's minimal disruption: only the ejected node's keys moved.
    assert all(moved[k] == owners[k] for k in keys if owners[k] != 81)
    wait_past(1.0)
    assert {k: p.consistent_hash(k).port for k in keys} == owners
    assert p.maglev_shared
    assert p.maglev is None
    assert len(published.entries) == MAGLEV_TABLE_SIZE


def test_least_request_prefers_the_shorter_expected_wait_of_two() -> None:
    load = memoryview(bytearray(8 * 48)).cast("Q")  # expected waits of ids 0.. at 8..
    load[1] = 1

    class Source:
        def load_view(self) -> tuple[memoryview, int, int, int]:
            return load, 8, 32, 1

    def wait(node_id: int, in_flight: int, latency_us: int) -> None:
        load[8 + node_id] = (in_flight + 1) * latency_us  # as the sidecar publishes it

    for i in range(32):
        wait(i, 0, 1000)  # 1 ms each
    p = make_picker(service())
    p.load_source = Source()
    wait(10, 5, 1000)  # node 80 (id 10) is busy
    picks = Counter(p.pick(strategy="least_request").port for _ in range(4000))
    assert picks[80] == 0  # two distinct nodes are drawn: the busy one always loses
    assert min(picks[q] for q in (81, 82, 83)) > 4000 / 4
    wait(10, 0, 1000)
    wait(11, 1, 1000)  # ties go to the first drawn: still uniform among the idle ones
    picks = Counter(p.pick(strategy="least_request").port for _ in range(4000))
    assert picks[81] == 0
    assert min(picks[q] for q in (80, 82, 83)) > 4000 / 4
    # Latency weighs in: 2 calls in flight on a 1 ms node wait less than 0 on a 10 ms node.
    wait(11, 0, 1000)
    wait(10, 2, 1000)
    wait(12, 0, 10_000)
    picks = Counter(p.pick(strategy="least_request").port for _ in range(4000))
    assert picks[82] == 0
    assert picks[80] > 0
    # Without feedback: P2C with equal loads, that is random.
    plain = make_picker(service())
    assert ports(plain, strategy="least_request") == {80, 81, 82, 83}


def test_cmctl_watch_reports_ejections_and_returns() -> None:
    from clustermap.cli.inspect import _diff
    from clustermap.region.layout import Meta
    from clustermap.region.reader import Snapshot

    def snap(gen: int, s: Service) -> Snapshot:
        return Snapshot(gen, Meta(), {"api": s}, 0, 1, False)

    plain, ejected = service(), service((2, 30))
    assert _diff(snap(1, plain), snap(2, ejected)) == [
        "generation 2 revision 0: api ejected 10.0.0.1:82: 5 consecutive failures"
    ]
    assert _diff(snap(2, ejected), snap(3, plain)) == [
        "generation 3 revision 0: api returned 10.0.0.1:82"
    ]


def test_least_request_as_the_services_default_strategy() -> None:
    """A service registered with strategy "least_request": a key-less pick is a P2C pick on the
    machine's expected waits, with or without ejections, and the record carries it."""
    load = memoryview(bytearray(8 * 48)).cast("Q")
    load[1] = 1
    for i in range(32):
        load[8 + i] = 1000

    class Source:
        def load_view(self) -> tuple[memoryview, int, int, int]:
            return load, 8, 32, 1

    load[8 + 10] = 50_000  # node 80 (id 10) waits 50 times longer
    for ejected in [(), ((1, 30),)]:  # node 81 ejected: an ExpiringPicker
        svc = replace(service(*ejected), strategy="least_request")
        assert L.decode_service(L.encode_service(svc)).strategy == "least_request"
        p = make_picker(svc)
        p.load_source = Source()
        assert isinstance(p, ExpiringPicker) == bool(ejected)
        picks = Counter(p.pick().port for _ in range(3000))
        assert picks[80] == 0  # two distinct nodes are drawn: the slow one always loses
        assert set(picks) == {81, 82, 83} - ({81} if ejected else set())
        assert Counter(p.default().port for _ in range(300))[80] == 0
    # Without feedback: P2C with equal costs, a random pick.
    assert ports(make_picker(replace(service(), strategy="least_request"))) == {80, 81, 82, 83}


def test_least_request_default_passes_the_servers_options_and_the_wire() -> None:
    from clustermap.server.validation import ServiceOptions
    from clustermap.wire import service_from_pb, service_to_pb

    assert ServiceOptions(strategy="least_request").strategy == "least_request"
    svc = Service("api", NODES, strategy="least_request")
    assert service_from_pb(service_to_pb(svc)).strategy == "least_request"
