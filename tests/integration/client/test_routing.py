"""Subsets and zones in the worker-side client, over real regions (docs/routing.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import clustermap
from clustermap import ClusterMap, InvalidSubset, NoAvailableNode
from clustermap.client import MAX_SUBSETS
from clustermap.model import DRAIN, Ejection, Node, Overlay, Service
from clustermap.region.layout import Meta
from clustermap.region.writer import RegionWriter

# 12 nodes: version v1 / v2 alternating, zones a / b / none in turn, weights 1-3.
NODES = tuple(
    Node(
        f"10.0.0.{i}",
        8080,
        weight=1 + i % 3,
        meta={"version": f"v{1 + i % 2}", **({"zone": "ab"[i % 3]} if i % 3 < 2 else {})},
    )
    for i in range(12)
)
V2 = {n.address for n in NODES if n.meta["version"] == "v2"}
KEYS = [f"user:{i}" for i in range(300)]
OTHER_PROCESS = """
import json, sys, clustermap
cm = clustermap.open(sys.argv[1])
sub = {"zone": "a", "version": "v2"}
print(json.dumps([cm.pick("s", k, subset=sub).address for k in json.loads(sys.argv[2])]))
"""


def publish(path: Path, *services: Service, zone: str | None = None) -> None:
    with RegionWriter(path, wait=5.0) as w:
        meta = None if zone is None else Meta(zone=zone)
        w.publish(services, meta=meta, sync_ns=time.time_ns(), force=zone is not None)


def zoned(zone_of: dict[int, str], count: int, **changes: object) -> tuple[Node, ...]:
    """``count`` nodes, node i in zone ``zone_of.get(i)`` (none if absent), then ``changes``
    applied to the nodes listed by index: ``status={3: "down"}``."""
    out = []
    for i in range(count):
        meta = {"zone": zone_of[i]} if i in zone_of else {}
        node = Node(f"10.1.0.{i}", 80, meta=meta)
        for field, per in changes.items():
            assert isinstance(per, dict)
            if i in per:
                node = node._replace(**{field: per[i]})
        out.append(node)
    return tuple(out)


# -- subsets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy", ["round_robin", "random", "weighted", "weighted_random", "least_request"]
)
def test_every_keyless_strategy_stays_in_the_subset(region_path: Path, strategy: str) -> None:
    publish(region_path, Service("s", NODES))
    cm = clustermap.open(region_path)
    seen = Counter(cm.pick("s", None, strategy, {"version": "v2"}).address for _ in range(600))
    assert set(seen) == V2  # every node of the subset, and only those
    with cm.call("s", None, strategy, {"version": "v2"}) as node:
        assert node.address in V2


@pytest.mark.parametrize("default", ["round_robin", "random", "weighted", "consistent_hash"])
def test_the_service_default_strategy_runs_inside_the_subset(
    region_path: Path, default: str
) -> None:
    publish(region_path, Service("s", NODES, strategy=default))
    cm = clustermap.open(region_path)
    assert {cm.pick("s", subset={"version": "v2"}).address for _ in range(400)} == V2
    assert {n.address for n in cm.nodes("s", {"version": "v2"})} == V2
    assert {n.address for n in clustermap.open(region_path).nodes("s")} == {
        n.address for n in NODES
    }


def test_weights_hold_inside_a_subset(region_path: Path) -> None:
    publish(region_path, Service("s", NODES))
    cm = clustermap.open(region_path)
    sub = {"version": "v2"}
    seen = Counter(cm.pick("s", None, "weighted", sub).address for _ in range(6000))
    weight = {n.address: n.weight for n in NODES}
    total = sum(weight[a] for a in V2)
    for address in V2:  # smooth WRR: exact shares over whole rounds
        assert seen[address] == 6000 * weight[address] // total


def test_keyed_picks_are_stable_within_a_subset(region_path: Path) -> None:
    publish(region_path, Service("s", NODES, meta={"hash": "maglev"}))
    a, b = clustermap.open(region_path), ClusterMap(region_path)
    sub = {"version": "v2", "zone": "a"}
    first = [a.pick("s", k, subset=sub).address for k in KEYS]
    # another handle, the pairs in another order, the strategy named: the same node per key
    assert [b.pick("s", k, None, {"zone": "a", "version": "v2"}).address for k in KEYS] == first
    assert [b.pick("s", k, "consistent_hash", sub).address for k in KEYS] == first
    # and another process, with its own hash seed
    other = subprocess.run(
        [sys.executable, "-c", OTHER_PROCESS, str(region_path), json.dumps(KEYS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "7"},
    )
    assert json.loads(other.stdout) == first
    inside = {n.address for n in NODES if n.meta.get("zone") == "a" and n.address in V2}
    assert set(first) == inside
    # nodes outside the subset come and go: no key of the subset moves
    fewer = tuple(n for i, n in enumerate(NODES) if i < 4 or n.address in inside)
    publish(region_path, Service("s", fewer, meta={"hash": "maglev"}))
    assert [a.pick("s", k, subset=sub).address for k in KEYS] == first


def test_a_subset_emptying_gives_no_available_node_naming_it(region_path: Path) -> None:
    publish(region_path, Service("s", NODES))
    cm = clustermap.open(region_path)
    cm.pick("s", subset={"version": "v2"})
    drained = tuple(n._replace(status=DRAIN) if n.address in V2 else n for n in NODES)
    publish(region_path, Service("s", drained))
    with pytest.raises(NoAvailableNode, match=r"'s' has no node with \{version=v2\} that may"):
        cm.pick("s", subset={"version": "v2"})
    with pytest.raises(NoAvailableNode, match="version=v2"):
        cm.nodes("s", {"version": "v2"})
    with pytest.raises(NoAvailableNode, match=r"no node with \{version=v9\}$"):
        cm.pick("s", "k", subset={"version": "v9"})
    with pytest.raises(NoAvailableNode, match="version=v2"), cm.call("s", subset={"version": "v2"}):
        pass
    assert cm.pick("s", subset={"version": "v1"}).address not in V2  # the rest still picks


def test_subset_pickers_are_cached_per_version_and_bounded(region_path: Path) -> None:
    publish(region_path, Service("s", NODES), Service("t", NODES))
    cm = clustermap.open(region_path)
    sub = {"version": "v2", "zone": "a"}
    p = cm.picker("s", sub)
    assert cm.picker("s", sub) is p  # warm: the same picker
    assert cm.picker("s", {"zone": "a", "version": "v2"}) is p  # any order of the same pairs
    assert cm.picker("s", dict(sub)) is p
    publish(region_path, Service("t", NODES[:5]))
    assert cm.picker("s", sub) is p  # another service changed: still warm
    publish(region_path, Service("s", NODES[:9]))
    q = cm.picker("s", sub)
    assert q is not p
    assert cm.picker("s", sub) is q
    publish(region_path, Service("t", NODES, meta={"subset_fallback": "any"}))
    for i in range(3 * MAX_SUBSETS):  # ever new subsets, each cached: memory stays bounded
        cm.pick("t", subset={"version": f"x{i}"})
        assert len(cm._subsets) <= MAX_SUBSETS


def test_subset_fallback_policies(region_path: Path) -> None:
    base = {"subset_default": "version=v1"}
    publish(
        region_path,
        Service("none", NODES),
        Service("any", NODES, meta={"subset_fallback": "any"}),
        Service("default", NODES, meta={**base, "subset_fallback": "default"}),
    )
    cm = clustermap.open(region_path)
    missing = {"version": "v3"}
    with pytest.raises(NoAvailableNode, match="version=v3"):
        cm.pick("none", subset=missing)
    assert {cm.pick("any", subset=missing).address for _ in range(200)} == {
        n.address for n in NODES
    }
    v1 = {n.address for n in NODES} - V2
    assert {cm.pick("default", subset=missing).address for _ in range(200)} == v1
    assert {n.address for n in cm.nodes("default", missing)} == v1
    assert "default subset {version=v1}" in cm.route("default", missing).fallback
    assert {cm.pick("default", subset={"version": "v2"}).address for _ in range(200)} == V2


@pytest.mark.parametrize(
    "bad",
    [["version", "v2"], "version=v2", {"version": 2}, {2: "v2"}, {"v": "x" * 600}, {"": "a"}],
)
def test_a_bad_subset_is_a_clear_error_and_the_worker_carries_on(
    region_path: Path, bad: object
) -> None:
    publish(region_path, Service("s", NODES))
    cm = clustermap.open(region_path)
    for _ in range(2):  # a second time too: nothing bad was cached
        with pytest.raises(InvalidSubset, match="subset") as err:
            cm.pick("s", subset=bad)  # type: ignore[arg-type]
        assert isinstance(err.value, TypeError)
        assert isinstance(err.value, ValueError)
        assert "\n" not in str(err.value)
        with pytest.raises(InvalidSubset):
            cm.nodes("s", bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidSubset):
        cm.pick("s", subset={"v": ["unhashable"]})  # type: ignore[dict-item]
    assert cm.pick("s").address in {n.address for n in NODES}


# -- zones -----------------------------------------------------------------------------------


def test_picks_stay_in_the_local_zone_and_spill_when_it_drains(region_path: Path) -> None:
    zones = {i: "a" if i < 4 else "b" for i in range(8)}
    nodes = zoned(zones | {8: "c"}, 10)  # 4 in a, 4 in b, 1 in c, 1 without a zone
    publish(region_path, Service("s", nodes), zone="a")
    cm = clustermap.open(region_path)
    assert cm.zone == "a"
    local = {n.address for n in nodes[:4]}
    for strategy in (None, "round_robin", "random", "weighted", "least_request"):
        assert {cm.pick("s", None, strategy).address for _ in range(200)} == local
    assert cm.route("s").zone.state == "local"
    # 3 of 4 healthy (75 %) stays local; 2 of 4 spills to every zone, the zoneless node too
    publish(region_path, Service("s", zoned(zones | {8: "c"}, 10, status={0: "down"})))
    assert {cm.pick("s").address for _ in range(200)} == local - {nodes[0].address}
    spilled = zoned(zones | {8: "c"}, 10, status={0: "down", 1: DRAIN})
    publish(region_path, Service("s", spilled))
    everyone = {n.address for n in spilled if n.healthy}
    assert {cm.pick("s").address for _ in range(400)} == everyone
    decision = cm.route("s").zone
    assert decision.state == "spilled"
    assert "2 of 4 nodes healthy in zone a" in decision.reason
    # the zone recovers: picks return to it
    publish(region_path, Service("s", nodes))
    assert {cm.pick("s").address for _ in range(200)} == local


def test_keyed_picks_ignore_zones(region_path: Path) -> None:
    nodes = zoned({i: "ab"[i % 2] for i in range(8)}, 8)
    publish(region_path, Service("s", nodes), zone="a")
    in_a = clustermap.open(region_path)
    publish(region_path, Service("s", nodes), zone="b")
    in_b = clustermap.open(region_path)
    assert [in_a.pick("s", k).address for k in KEYS] == [in_b.pick("s", k).address for k in KEYS]
    assert len({in_a.pick("s", k).address for k in KEYS}) == 8


def test_small_services_panic_and_ejections_spill(region_path: Path) -> None:
    few = zoned({0: "a", 1: "a", 2: "b", 3: "b", 4: "b"}, 5)  # under min_cluster_size 6
    sized = zoned({i: "a" if i < 3 else "b" for i in range(6)}, 6)
    tuned = Service("tuned", few, meta={"zone_min_cluster_size": "2"})
    down = dict.fromkeys(range(3, 6), "down")
    panic = Service("panic", zoned({i: "a" if i < 3 else "b" for i in range(6)}, 6, status=down))
    panic = Service("panic", panic.nodes, panic_threshold=0.6)
    now = time.time_ns()
    ejected = Service(
        "ejected",
        sized,
        overlay=Overlay(tuple(range(6)), (Ejection(0, now + 60_000_000_000, "test"),)),
    )
    publish(region_path, Service("few", few), tuned, panic, ejected, zone="a")
    cm = clustermap.open(region_path)
    assert len({cm.pick("few").address for _ in range(100)}) == 5
    assert "fewer than zone_min_cluster_size 6" in cm.route("few").zone.reason
    assert {cm.pick("tuned").address for _ in range(100)} == {"10.1.0.0:80", "10.1.0.1:80"}
    assert cm.route("panic").zone.reason == "panic mode (3 of 6 nodes healthy)"
    assert len({cm.pick("panic").address for _ in range(100)}) == 6  # panic: every node
    # one of three local nodes ejected: 2 of 3 (67 %) is under 71 %: spill, without it
    assert {cm.pick("ejected").address for _ in range(200)} == {n.address for n in sized[1:]}
    with pytest.raises(ValueError, match="unknown strategy"):
        cm.pick("few", None, "nope")


def test_zones_compose_with_subsets_and_weights(region_path: Path) -> None:
    nodes = tuple(
        Node(f"10.2.0.{i}", 80, weight=1 + i % 2, meta={"zone": "ab"[i % 2], "v": f"{i % 3}"})
        for i in range(18)
    )
    publish(region_path, Service("s", nodes), zone="b")
    cm = clustermap.open(region_path)
    sub = {"v": "1"}  # 6 nodes, 3 in each zone
    want = {n.address for n in nodes if n.meta == {"zone": "b", "v": "1"}}
    seen = Counter(cm.pick("s", None, "weighted", sub).address for _ in range(300))
    assert set(seen) == want
    assert cm.route("s", sub).zone.state == "local"
    assert {cm.pick("s", None, "weighted").address for _ in range(300)} == {
        n.address for n in nodes if n.meta["zone"] == "b"
    }


def test_a_zone_the_rules_refuse_turns_zone_routing_off(region_path: Path) -> None:
    nodes = zoned(dict.fromkeys(range(6), "bad zone"), 8)
    publish(region_path, Service("s", nodes), zone="bad zone")
    cm = clustermap.open(region_path)
    assert cm.zone == ""
    assert cm.route("s").zone.state == "off"
    assert len({cm.pick("s").address for _ in range(100)}) == 8


def test_a_zone_change_rebuilds_cached_pickers(region_path: Path) -> None:
    nodes = zoned({i: "ab"[i % 2] for i in range(8)}, 8)
    publish(region_path, Service("s", nodes), zone="a")
    cm = clustermap.open(region_path)
    assert {int(cm.pick("s").host.rsplit(".", 1)[1]) % 2 for _ in range(50)} == {0}
    publish(region_path, Service("s", nodes), zone="b")  # as a sidecar restarted in b does
    assert {int(cm.pick("s").host.rsplit(".", 1)[1]) % 2 for _ in range(50)} == {1}
