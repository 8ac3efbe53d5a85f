"""Slow start: the pure ramp, its options, its place in the region record, the sidecar's clock
and the pickers' shares during and after a ramp (docs/slow-start.md)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from itertools import cycle, pairwise

import msgpack
import pytest

from clustermap.balance.picker import ExpiringPicker, ServicePicker, make_picker
from clustermap.balance.routing import restrict, route
from clustermap.balance.slowstart import (
    CHUNK,
    STEPS,
    RampingPicker,
    ramp_counts,
    ramp_factor,
    ramp_schedule,
    ramping,
)
from clustermap.errors import CorruptRegion
from clustermap.model import DOWN, Ejection, Node, Overlay, Service, SlowStart
from clustermap.region import layout as L
from clustermap.rules import SlowStartConfig, check_slow_start
from clustermap.sidecar.slowstart import RampClock

S = 1_000_000_000


# -- the ramp function ----------------------------------------------------------------------------


def test_ramp_factor_is_envoys_formula() -> None:
    assert ramp_factor(0.0, 10.0, 1.0, 0.1) == pytest.approx(0.1)  # max(elapsed, 1 s) / window
    assert ramp_factor(5.0, 10.0, 1.0, 0.1) == pytest.approx(0.5)
    assert ramp_factor(10.0, 10.0, 1.0, 0.1) == 1.0
    assert ramp_factor(99.0, 10.0, 1.0, 0.1) == 1.0
    assert ramp_factor(2.5, 10.0, 2.0, 0.1) == pytest.approx(0.5)  # (0.25) ** (1 / 2)
    assert ramp_factor(1.0, 100.0, 1.0, 0.1) == pytest.approx(0.1)  # min weight: 1 % -> 10 %
    assert ramp_factor(1.0, 100.0, 1.0, 0.0) == pytest.approx(0.01)
    assert ramp_factor(-5.0, 10.0, 1.0, 0.1) == pytest.approx(0.1)  # a ramp that starts later


@pytest.mark.parametrize("aggression", [0.5, 1.0, 2.0, 4.0])
def test_ramp_factor_rises_monotonically_to_one(aggression: float) -> None:
    values = [ramp_factor(t / 10, 30.0, aggression, 0.1) for t in range(0, 320)]
    assert all(a <= b for a, b in pairwise(values))
    assert values[0] >= 0.1
    assert values[-1] == 1.0


def test_ramp_counts_and_schedules_scale_only_the_ramping_nodes() -> None:
    ramp = SlowStart(10 * S, 1.0, 0.1, ())
    now = 100 * S
    assert ramp_counts({1: 2}, [(1, now - 5 * S)], ramp, now) == {1: STEPS}  # half of 2 x 20
    assert ramp_counts({0: 1}, [(0, now)], ramp, now) == {0: 2}  # 10 % of 20
    assert ramp_counts({0: 1}, [(0, now)], SlowStart(1000 * S, 1.0, 0.0, ()), now) == {0: 1}
    base = [0, 1, 0, 2]  # weights 2:1:1
    schedule = ramp_schedule(base, {1: 5})
    assert Counter(schedule) == {0: 2 * STEPS, 1: 5, 2: STEPS}
    positions = [k for k, i in enumerate(schedule) if i == 1]  # spread over the rounds
    gaps = [b - a for a, b in pairwise(positions)]
    assert max(gaps) - min(gaps) <= len(base)
    assert ramp_schedule(base, {}) == base * STEPS
    assert ramping(SlowStart(10 * S, 1.0, 0.1, ((0, now - 9 * S),)), now)
    assert not ramping(SlowStart(10 * S, 1.0, 0.1, ((0, now - 10 * S),)), now)
    assert not ramping(SlowStart(10 * S, 1.0, 0.1, ((0, now + 10**6 * S),)), now)  # garbage


# -- options ---------------------------------------------------------------------------------------


def test_service_meta_options() -> None:
    assert check_slow_start({}) == SlowStartConfig(None)
    assert check_slow_start({"slow_start": "30s"}) == SlowStartConfig(30.0)
    assert check_slow_start({"slow_start": "500ms"}).window_s == pytest.approx(0.5)
    assert check_slow_start({"slow_start": "2m"}).window_s == 120.0
    assert check_slow_start({"slow_start": "0"}).window_s == 0.0
    got = check_slow_start({"slow_start_aggression": "2", "slow_start_min_weight": "5%"})
    assert got == SlowStartConfig(None, 2.0, 5.0)


@pytest.mark.parametrize(
    "meta",
    [
        {"slow_start": "soon"},
        {"slow_start": "-1"},
        {"slow_start": "2h"},
        {"slow_start": "7200"},
        {"slow_start": "nan"},
        {"slow_start": "3s", "slow_start_aggression": "0"},
        {"slow_start": "3s", "slow_start_min_weight": "101"},
        {"slow_start": "3s", "slow_start_min_weight": "x"},
    ],
)
def test_bad_options_get_a_one_line_reason(meta: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"^meta slow_start") as info:
        check_slow_start(meta)
    assert "\n" not in str(info.value)


# -- the region record -----------------------------------------------------------------------------


def nodes(count: int, **kw: object) -> tuple[Node, ...]:
    return tuple(Node(f"10.0.0.{i}", 80, **kw) for i in range(count))  # type: ignore[arg-type]


def test_record_round_trip_and_older_readers() -> None:
    ramp = SlowStart(5 * S, 1.0, 0.1, ((2, 123), (0, 456)))
    svc = Service("s", nodes(3), slow_start=ramp)
    raw = L.encode_service(svc)
    back = L.decode_service(raw)
    assert back.slow_start == ramp
    assert back.overlay == Overlay((-1, -1, -1))  # a neutral 7th element carries the 8th
    # An older reader decodes the first seven elements and ignores the rest.
    doc = msgpack.unpackb(raw)
    assert len(doc) == 8
    assert L.decode_service(msgpack.packb(doc[:7])).nodes == svc.nodes
    # No ramp, no 8th element: records are what they were.
    assert len(msgpack.unpackb(L.encode_service(Service("s", nodes(3))))) == 6


@pytest.mark.parametrize(
    "bad",
    [
        [0, 1.0, 0.1, []],
        [S, 0.0, 0.1, []],
        [S, 1.0, 1.5, []],
        [S, 1.0, 0.1, [[3, 1]]],
        [S, 1.0, 0.1, [[0, "x"]]],
        [S, "1", 0.1, []],
        "junk",
    ],
)
def test_a_bad_slow_start_element_is_a_corrupt_record(bad: object) -> None:
    doc = msgpack.unpackb(
        L.encode_service(Service("s", nodes(3), slow_start=SlowStart(S, 1.0, 0.1, ())))
    )
    doc[7] = bad
    with pytest.raises(CorruptRegion):
        L.decode_service(msgpack.packb(doc))


# -- the sidecar's clock --------------------------------------------------------------------------


def test_clock_starts_ramps_for_joins_and_returns_only() -> None:
    clock = RampClock(default_window_s=10.0)
    first = Service("s", nodes(3))
    clock.observe(None, first, 1 * S)  # a service first seen does not ramp
    assert clock.decorate(first, 1 * S).slow_start is None
    second = Service("s", (*first.nodes, Node("10.0.0.9", 80)))
    clock.observe(first, second, 2 * S)  # a join
    got = clock.decorate(second, 3 * S).slow_start
    assert got == SlowStart(10 * S, 1.0, 0.1, ((3, 2 * S),))
    down = replace(second, nodes=(second.nodes[0]._replace(status=DOWN), *second.nodes[1:]))
    clock.observe(second, down, 4 * S)
    up = second
    clock.observe(down, up, 5 * S)  # back up
    got = clock.decorate(up, 6 * S).slow_start
    assert got is not None
    assert dict(got.since) == {0: 5 * S, 3: 2 * S}
    assert dict(clock.decorate(up, 12 * S + 1).slow_start.since) == {0: 5 * S}  # type: ignore[union-attr]
    assert clock.decorate(up, 15 * S).slow_start is None  # every ramp over


def test_clock_ramps_a_node_from_the_end_of_its_ejection() -> None:
    clock = RampClock(default_window_s=10.0)
    svc = Service("s", nodes(3), overlay=Overlay((0, 1, 2), (Ejection(1, 50 * S, "5 failures"),)))
    got = clock.decorate(svc, 20 * S).slow_start
    assert got is not None
    assert got.since == ((1, 50 * S),)
    after = replace(svc, overlay=Overlay((0, 1, 2)))  # the ejection ended: the ramp goes on
    assert clock.decorate(after, 55 * S).slow_start.since == ((1, 50 * S),)  # type: ignore[union-attr]


def test_service_meta_overrides_the_sidecar_default() -> None:
    clock = RampClock(default_window_s=0.0)
    base = Service("s", nodes(2))
    grown = Service("s", nodes(3))
    clock.observe(base, grown, 1 * S)
    assert clock.decorate(grown, 2 * S).slow_start is None  # off by default
    meta = {"slow_start": "30s", "slow_start_aggression": "2", "slow_start_min_weight": "20"}
    got = clock.decorate(replace(grown, meta=meta), 2 * S).slow_start
    assert got == SlowStart(30 * S, 2.0, 0.2, ((2, 1 * S),))
    on = RampClock(default_window_s=30.0)
    on.observe(base, grown, 1 * S)
    assert on.decorate(replace(grown, meta={"slow_start": "0"}), 2 * S).slow_start is None


def test_a_restarted_sidecar_takes_the_ramps_back_from_the_region() -> None:
    ramp = SlowStart(10 * S, 1.0, 0.1, ((1, 5 * S),))
    published = L.decode_service(L.encode_service(Service("s", nodes(2), slow_start=ramp)))
    clock = RampClock(default_window_s=10.0)
    clock.seed([published])
    assert clock.decorate(Service("s", nodes(2)), 6 * S).slow_start == ramp


# -- pickers ---------------------------------------------------------------------------------------


def ramped(count: int, since_s: float, window_s: float = 3600.0, **kw: object) -> Service:
    """``count`` nodes, the last ramping since ``since_s`` seconds ago."""
    now = time.time_ns()
    ramp = SlowStart(int(window_s * S), 1.0, 0.1, ((count - 1, now - int(since_s * S)),))
    return Service("s", nodes(count, **kw), slow_start=ramp)


def share(picks: list[Node], node: Node) -> float:
    return Counter(n.address for n in picks)[node.address] / len(picks)


@pytest.mark.parametrize("strategy", ["round_robin", "weighted", "least_request"])
def test_a_ramping_node_gets_its_share(strategy: str) -> None:
    svc = ramped(4, since_s=1800.0)  # half-way: 0.5 of a normal share
    picker = make_picker(svc)
    assert isinstance(picker, RampingPicker)
    picks = [picker.pick(strategy=strategy) for _ in range(60 * CHUNK)]
    expected = 0.5 / 3.5
    assert share(picks, svc.nodes[3]) == pytest.approx(
        expected, rel=0.25 if strategy == "least_request" else 0.05
    )
    for n in svc.nodes[:3]:
        assert share(picks, n) == pytest.approx(
            1 / 3.5, rel=0.25 if strategy == "least_request" else 0.05
        )


def test_round_robin_at_the_start_of_a_ramp_sends_the_minimum() -> None:
    svc = ramped(4, since_s=0.0)
    picker = make_picker(svc)
    picks = [picker.pick() for _ in range(62 * CHUNK)]
    assert share(picks, svc.nodes[3]) == pytest.approx(2 / 62, rel=0.1)  # 10 %: 2 of 20 levels


def test_weights_and_ramps_compose() -> None:
    svc = ramped(3, since_s=1800.0)
    svc = replace(svc, nodes=(svc.nodes[0]._replace(weight=2), *svc.nodes[1:]))
    picker = make_picker(svc)
    picks = [picker.pick(strategy="weighted") for _ in range(70 * CHUNK)]
    assert share(picks, svc.nodes[0]) == pytest.approx(2 / 3.5, rel=0.05)
    assert share(picks, svc.nodes[2]) == pytest.approx(0.5 / 3.5, rel=0.05)
    # Strategies that do not ramp: random spreads evenly.
    picks = [picker.pick(strategy="random") for _ in range(6000)]
    assert share(picks, svc.nodes[2]) == pytest.approx(1 / 3, rel=0.15)


def test_no_ramp_running_gives_the_plain_pickers() -> None:
    assert type(make_picker(ramped(4, since_s=4000.0))) is ServicePicker
    svc = ramped(4, since_s=4000.0)
    ejected = replace(
        svc, overlay=Overlay((0, 1, 2, 3), (Ejection(0, time.time_ns() + 60 * S, "x"),))
    )
    assert type(make_picker(ejected)) is ExpiringPicker


def test_the_picker_turns_plain_when_the_ramp_ends() -> None:
    svc = ramped(4, since_s=0.0, window_s=1.0)  # ends within a second (max(elapsed, 1 s))
    picker = make_picker(svc)
    assert isinstance(picker, RampingPicker)
    first = picker.default_it
    deadline = time.monotonic() + 60
    while picker.default_it is first:
        assert time.monotonic() < deadline, "the ramp never ended"
        picker.pick()
        picker.pick(strategy="least_request")
    assert isinstance(picker.default_it, cycle)  # a plain round-robin again: O(1), no clock
    picks = [picker.pick() for _ in range(400)]
    assert share(picks, svc.nodes[3]) == 0.25
    picks = [picker.pick(strategy="weighted") for _ in range(400)]
    assert share(picks, svc.nodes[3]) == 0.25


def test_after_fork_keeps_the_ramp() -> None:
    svc = ramped(4, since_s=1800.0)
    picker = make_picker(svc)
    picker.after_fork()
    picks = [picker.pick() for _ in range(70 * CHUNK)]
    assert share(picks, svc.nodes[3]) == pytest.approx(0.5 / 3.5, rel=0.05)


def test_ejections_and_ramps_compose() -> None:
    svc = ramped(4, since_s=1800.0)
    until = time.time_ns() + 600 * S
    svc = replace(svc, overlay=Overlay((0, 1, 2, 3), (Ejection(0, until, "5 failures"),)))
    picker = make_picker(svc)
    assert isinstance(picker, RampingPicker)
    picks = [picker.pick() for _ in range(50 * CHUNK)]
    assert share(picks, svc.nodes[0]) == 0.0  # ejected
    assert share(picks, svc.nodes[3]) == pytest.approx(0.5 / 2.5, rel=0.05)


def test_least_request_sees_an_ejection_end_during_a_ramp() -> None:
    svc = ramped(4, since_s=1800.0)
    until = time.time_ns() + S // 2
    svc = replace(svc, overlay=Overlay((0, 1, 2, 3), (Ejection(0, until, "5 failures"),)))
    picker = make_picker(svc)
    assert isinstance(picker, RampingPicker)
    picks = [picker.pick(strategy="least_request") for _ in range(4 * CHUNK)]
    if time.time_ns() < until:
        assert share(picks, svc.nodes[0]) == 0.0
    deadline = time.monotonic() + 60
    while picker.pick(strategy="least_request").address != svc.nodes[0].address:
        assert time.monotonic() < deadline, "the ejected node never came back"
    picks = [picker.pick(strategy="least_request") for _ in range(40 * CHUNK)]
    assert share(picks, svc.nodes[3]) == pytest.approx(0.5 / 3.5, rel=0.3)  # still ramping


def test_a_ramp_that_ended_before_a_fork_leaves_plain_iterators() -> None:
    svc = ramped(4, since_s=0.0, window_s=1.0)
    picker = make_picker(svc)
    assert isinstance(picker, RampingPicker)
    deadline = time.monotonic() + 60
    while ramping(svc.slow_start, time.time_ns()):  # type: ignore[arg-type]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    picker.after_fork()  # as in a forked worker, with no pick since the ramp ended
    assert isinstance(picker.default_it, cycle)
    picks = [picker.pick(strategy="weighted") for _ in range(400)]
    assert share(picks, svc.nodes[3]) == 0.25


# -- inside a subset or a zone (docs/routing.md) ---------------------------------------------------


def tagged(ramping_position: int, since_s: float) -> Service:
    """Six nodes: 0-3 of version v2 (0-1 in zone a), 4-5 of v1; one ramping since ``since_s``."""
    now = time.time_ns()
    out = tuple(
        Node(f"10.0.0.{i}", 80, meta={"version": "v2" if i < 4 else "v1", "zone": "ab"[i // 2 % 2]})
        for i in range(6)
    )
    ramp = SlowStart(3600 * S, 1.0, 0.1, ((ramping_position, now - int(since_s * S)),))
    return Service("s", out, slow_start=ramp)


@pytest.mark.parametrize("strategy", ["round_robin", "weighted", "least_request"])
def test_subset_picks_ramp(strategy: str) -> None:
    svc = tagged(3, since_s=1800.0)  # half-way: 0.5 of a normal share
    found = route(svc, (("version", "v2"),), "", time.time_ns())
    assert isinstance(found.picker, RampingPicker)
    picks = [found.picker.pick(strategy=strategy) for _ in range(60 * CHUNK)]
    rel = 0.25 if strategy == "least_request" else 0.05
    assert share(picks, svc.nodes[3]) == pytest.approx(0.5 / 3.5, rel=rel)
    for n in svc.nodes[:3]:
        assert share(picks, n) == pytest.approx(1 / 3.5, rel=rel)
    assert not {n.meta["version"] for n in picks} - {"v2"}


def test_a_ramp_outside_the_subset_leaves_its_picker_plain() -> None:
    svc = tagged(5, since_s=1800.0)
    sub = restrict(svc, [0, 1, 2, 3])
    assert sub.slow_start is None
    assert type(route(svc, (("version", "v2"),), "", time.time_ns()).picker) is ServicePicker
    ramp = restrict(svc, [5, 4]).slow_start  # positions follow the nodes
    assert ramp is not None
    assert [p for p, _ in ramp.since] == [0]


def test_zone_local_picks_ramp() -> None:
    svc = tagged(1, since_s=1800.0)  # zone a: nodes 0, 1, 4, 5 -> 1 ramps
    meta = {"zone_min_cluster_size": "1"}
    svc = replace(svc, meta=meta)
    found = route(svc, (), "a", time.time_ns())
    assert found.zone.state == "local"
    assert isinstance(found.picker, RampingPicker)
    picks = [found.picker.pick() for _ in range(70 * CHUNK)]
    assert share(picks, svc.nodes[1]) == pytest.approx(0.5 / 3.5, rel=0.05)
    assert {n.meta["zone"] for n in picks} == {"a"}
