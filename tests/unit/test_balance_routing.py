"""The routing layer's pure rules: subset pairs, routing options, the zone decision
(docs/routing.md), and the one rule for routing options shared by server and sidecar."""

from __future__ import annotations

import pytest

from clustermap import rules
from clustermap.balance.routing import (
    LOCAL,
    OFF,
    SPILLED,
    restrict,
    route,
    routing_options,
    subset_pairs,
    zone_decision,
    zone_name,
)
from clustermap.errors import InvalidSubset, NoAvailableNode
from clustermap.model import DOWN, Ejection, Node, Overlay, Service
from clustermap.server.validation import ServiceOptions, ValidationError
from clustermap.sidecar.validate import InvalidAnswer, check_services

DEFAULT = rules.Routing()


def nodes(*zones: str | None, down: tuple[int, ...] = ()) -> tuple[Node, ...]:
    return tuple(
        Node(
            f"10.0.0.{i}",
            80,
            status=DOWN if i in down else "up",
            meta={} if z is None else {"zone": z},
        )
        for i, z in enumerate(zones)
    )


def test_subset_pairs_are_sorted_and_checked() -> None:
    assert subset_pairs({"b": "2", "a": "1"}) == (("a", "1"), ("b", "2"))
    assert subset_pairs({}) == ()
    for bad in (None, [("a", "1")], "a=1", {"a": 1}, {1: "a"}, {"": "x"}, {"a": "x" * 513}):
        with pytest.raises(InvalidSubset):
            subset_pairs(bad)
    with pytest.raises(InvalidSubset, match="at most 32"):
        subset_pairs({f"k{i}": "v" for i in range(33)})


def test_zone_names_follow_the_meta_key_rule() -> None:
    for good in ("a", "eu-west-1a", "us_east.2", "dc1/rack2"):
        assert rules.check_zone(good) == good
        assert zone_name(good) == good
    for bad in ("", "a b", "-a", "z" * 65, "a\x1bb", "zone\u202e"):
        with pytest.raises(ValueError, match="zone name"):
            rules.check_zone(bad)
        assert zone_name(bad) == ""  # from a region: no zone routing, never an error


def test_routing_options_parse_and_refuse() -> None:
    got = rules.check_routing(
        {
            "subset_fallback": "default",
            "subset_default": "version=v1, tier=gold",
            "zone_min_healthy": "0.5",
            "zone_min_cluster_size": "3",
            "subset_keys": "version; version,tier;tier , version;;",
        }
    )
    assert got == rules.Routing(
        "default",
        (("tier", "gold"), ("version", "v1")),
        0.5,
        3,
        (("version",), ("tier", "version")),
    )
    assert rules.check_routing({}) == DEFAULT
    assert DEFAULT.zone_min_healthy == pytest.approx(1 / 1.4)
    assert DEFAULT.zone_min_cluster_size == 6
    for bad in (
        {"subset_fallback": "all"},
        {"subset_fallback": "default"},
        {"subset_default": "version"},
        {"subset_default": "=v1"},
        {"zone_min_healthy": "1.5"},
        {"zone_min_healthy": "nan"},
        {"zone_min_cluster_size": "-1"},
        {"zone_min_cluster_size": "x"},
        {"subset_keys": "version,,tier"},
        {"subset_keys": "ver sion"},
        {"subset_keys": "-version"},
    ):
        with pytest.raises(ValueError, match="meta"):
            rules.check_routing(bad)
        assert routing_options(bad) == DEFAULT  # a worker meeting one anyway: defaults
        with pytest.raises(ValidationError):  # the server refuses such a service
            ServiceOptions(meta=bad)
        with pytest.raises(InvalidAnswer):  # and so does every sidecar
            check_services([Service("s", (), meta=bad)])


def test_zone_decision() -> None:
    six = nodes("a", "a", "a", "b", "b", "b")
    assert zone_decision(Service("s", six), "", DEFAULT, 0).state == OFF
    d = zone_decision(Service("s", six), "a", DEFAULT, 0)
    assert (d.state, d.local, d.reason) == (LOCAL, (0, 1, 2), "3 of 3 nodes healthy in zone a")
    assert zone_decision(Service("s", six), "c", DEFAULT, 0).reason == "no node in zone c"
    few = Service("s", six[:5])
    assert zone_decision(few, "a", DEFAULT, 0).state == SPILLED
    assert zone_decision(few, "a", DEFAULT._replace(zone_min_cluster_size=5), 0).state == LOCAL
    # 5 of 7 healthy is exactly 1/1.4: stays; 4 of 7 spills
    seven = ("a",) * 7 + ("b",) * 7
    assert zone_decision(Service("s", nodes(*seven, down=(0, 1))), "a", DEFAULT, 0).state == LOCAL
    spilled = zone_decision(Service("s", nodes(*seven, down=(0, 1, 2))), "a", DEFAULT, 0)
    assert spilled.state == SPILLED
    assert spilled.reason == "4 of 7 nodes healthy in zone a, under zone_min_healthy 71%"
    # a node without zone meta is never local
    zoneless = nodes(None, "a", "a", "a", "b", "b", "b")
    assert zone_decision(Service("s", zoneless), "a", DEFAULT, 0).local == (1, 2, 3)
    # live ejections count as unhealthy; expired ones do not
    ejected = Overlay(tuple(range(6)), (Ejection(0, 10_000, "x"),))
    svc = Service("s", six, overlay=ejected)
    assert zone_decision(svc, "a", DEFAULT, 5_000).state == SPILLED
    assert zone_decision(svc, "a", DEFAULT, 20_000).state == LOCAL


def test_route_restricts_and_falls_back() -> None:
    svc = Service("s", nodes("a", "a", "a", "b", "b", "b", "b"))
    r = route(svc, (("zone", "b"),), "", 0)
    assert r.picker is r.keyed
    assert [n.meta["zone"] for n in r.keyed.service.nodes] == ["b"] * 4
    with pytest.raises(NoAvailableNode, match=r"'s' has no node with \{zone=c\}$"):
        route(svc, (("zone", "c"),), "", 0)
    r = route(svc, (), "a", 0)
    assert r.picker is not r.keyed
    assert len(r.picker.nodes) == 3
    assert len(r.keyed.nodes) == 7
    assert r.zone.state == LOCAL


def test_restrict_carries_the_overlay_with_its_nodes() -> None:
    svc = Service(
        "s",
        nodes("a", "b", "a", "b"),
        overlay=Overlay((10, 11, 12, 13), (Ejection(2, 99, "r"), Ejection(1, 98, "q"))),
    )
    sub = restrict(svc, [1, 2])
    assert sub.overlay == Overlay((11, 12), (Ejection(1, 99, "r"), Ejection(0, 98, "q")))
    assert sub.nodes == (svc.nodes[1], svc.nodes[2])
