"""Protection decisions: mass drops, services emptied by a full map, holds that expire."""

from __future__ import annotations

from clustermap.model import Node, Service
from clustermap.sidecar.guard import Guard, GuardPolicy


def svc(name: str, n: int) -> Service:
    return Service(name, tuple(Node(f"10.0.0.{i}", 80) for i in range(n)))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


PUBLISHED = {"a": svc("a", 4), "b": svc("b", 4), "c": svc("c", 2)}


def test_ordinary_changes_pass() -> None:
    g = Guard(GuardPolicy())
    d = g.decide({**PUBLISHED, "a": svc("a", 3), "d": svc("d", 1)}, PUBLISHED, full=True)
    assert {s.name for s in d.upserts} == {"a", "d"}
    assert not d.protected


def test_an_empty_map_is_held_until_max_hold() -> None:
    clock = Clock()
    g = Guard(GuardPolicy(max_drop=0.5, max_hold=60), clock)
    d = g.decide({}, PUBLISHED, full=True)
    assert d.mass_hold
    assert d.upserts == d.removals == ()
    assert "10 of 10 nodes" in d.reason
    clock.now = 59
    assert g.decide({}, PUBLISHED, full=False).mass_hold  # a later delta keeps the hold
    clock.now = 61
    d = g.decide({}, PUBLISHED, full=True)
    assert not d.mass_hold
    assert d.released == ("*",)
    assert set(d.removals) == {"a", "b", "c"}


def test_a_service_emptied_by_a_full_map_keeps_its_nodes() -> None:
    clock = Clock()
    g = Guard(GuardPolicy(max_drop=0.9, max_hold=10), clock)
    server = {"a": svc("a", 4), "b": Service("b", ()), "d": svc("d", 1)}  # c gone, b emptied
    d = g.decide(server, PUBLISHED, full=True)
    assert set(d.held) == {"b", "c"}
    assert [s.name for s in d.upserts] == ["d"]
    assert d.removals == ()
    assert "b, c" in d.reason
    # The server's b comes back through a delta: released; c stays held.
    d = g.decide({**server, "b": svc("b", 1)}, PUBLISHED, full=False)
    assert d.held == ("c",)
    clock.now = 11
    d = g.decide(server, PUBLISHED, full=False)
    assert "c" in d.released
    assert "c" in d.removals


def test_a_delta_emptying_a_service_is_trusted() -> None:
    g = Guard(GuardPolicy())
    d = g.decide({**PUBLISHED, "c": Service("c", ())}, PUBLISHED, full=False)
    assert not d.protected
    assert [s.name for s in d.upserts] == ["c"]


def test_protection_can_be_turned_off() -> None:
    d = Guard(GuardPolicy(enabled=False)).decide({}, PUBLISHED, full=True)
    assert set(d.removals) == set(PUBLISHED)


def test_an_ordinary_delta_is_decided_on_its_changed_names_only() -> None:
    g = Guard(GuardPolicy())
    server = {**PUBLISHED, "a": svc("a", 5), "z": svc("z", 1)}  # "z" is not in `changed`
    d = g.decide(server, PUBLISHED, full=False, changed=["a", "c"])
    assert [s.name for s in d.upserts] == ["a"]
    assert d.removals == ()
    d = g.decide({"a": svc("a", 4), "b": svc("b", 4)}, PUBLISHED, full=False, changed=["c"])
    assert d.removals == ("c",)
