"""Registry and store logic without gRPC: revisions, deltas, expiry, self-preservation, warm-up."""

from __future__ import annotations

import pytest

from clustermap.checksum import map_checksum
from clustermap.server.changelog import ChangeLog
from clustermap.server.registry import (
    DELTA,
    FULL,
    NOT_MODIFIED,
    NOT_READY,
    Conflict,
    NotFound,
    Registry,
    StaticNode,
)
from clustermap.server.store import Delete, MemoryStore
from clustermap.server.validation import NodeAddress, NodeUpdate, Registration, ServiceOptions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**kw) -> tuple[Registry, Clock, MemoryStore]:
    clock = Clock()
    store = MemoryStore(epoch="E", clock=clock)
    kw.setdefault("warmup", 0)
    return Registry(store, clock=clock, log_size=kw.pop("log_size", 100), **kw), clock, store


def r(service: str, port: int, host: str = "h", **kw) -> Registration:
    return Registration(service=service, host=host, port=port, **kw)


def test_change_log_answers_from_its_floor() -> None:
    log = ChangeLog(size=2)
    for rev in range(1, 5):
        log.append(rev, ["a"])
    assert log.floor == 2
    assert log.since(1) is None
    assert log.since(2) == {"a"}
    assert log.since(4) == frozenset()
    assert log.since(5) is None
    log.remember(1, 3, frozenset({"b"}))  # a bridge from the store's history
    assert log.since(1) == {"a", "b"}


def test_no_op_changes_keep_the_revision_and_checksum() -> None:
    reg, _, store = make()
    reg.register(r("a", 1, ttl=0.0))
    assert reg.revision == 1
    reg.update_node(NodeUpdate(service="a", host="h", port=1))  # nothing to change
    assert reg.revision == 1
    reg.deregister(NodeAddress(service="a", host="h", port=1))
    assert reg.revision == 2
    assert reg.status().checksum == 0
    assert store.commit([Delete(("a", "h", 1))]) == (2, 2)  # deleting nothing: no revision


def test_poll_kinds_and_checksum() -> None:
    reg, _, _ = make()
    reg.register(r("a", 1))
    full = reg.poll("", 0)
    assert full.kind == FULL
    assert full.revision == 1
    assert full.checksum == map_checksum(s.digest for s in full.services)
    assert reg.poll("E", 1).kind == NOT_MODIFIED
    reg.register(r("b", 1))
    delta = reg.poll("E", 1)
    assert delta.kind == DELTA
    assert [s.service.name for s in delta.services] == ["b"]
    assert delta.checksum == reg.status().checksum
    reg.deregister(NodeAddress(service="a", host="h", port=1))
    delta = reg.poll("E", 2)
    assert delta.removed == ("a",)
    assert delta.services == ()
    assert reg.poll("X", 3).kind == FULL
    assert reg.poll("E", 99).kind == FULL


def test_filtered_poll() -> None:
    reg, _, _ = make()
    reg.register(r("a", 1))
    reg.register(r("b", 1))
    ans = reg.poll("E", 1, frozenset({"b"}))
    assert ans.kind == DELTA
    assert [s.service.name for s in ans.services] == ["b"]
    ans = reg.poll("E", 1, frozenset({"a"}))
    assert ans.kind == NOT_MODIFIED
    assert ans.revision == 2


def test_warmup_answers_not_ready_until_it_passes() -> None:
    reg, clock, _ = make(warmup=5)
    reg.register(r("a", 1))
    ans = reg.poll("", 0)
    assert ans.kind == NOT_READY
    assert ans.services == ()
    assert ans.retry_after == 5
    clock.now += 5
    assert reg.poll("", 0).kind == FULL


def test_leases_expire_and_heartbeats_renew() -> None:
    reg, clock, _ = make(default_ttl=10)
    lease = reg.register(r("a", 1)).lease_id
    reg.register(r("a", 2, ttl=0.0))
    clock.now += 8
    reg.heartbeat(lease)
    clock.now += 8
    assert reg.expire() == []
    clock.now += 3
    assert reg.expire() == [("a", "h:1")]
    with pytest.raises(NotFound):
        reg.heartbeat(lease)
    _, services = reg.services()
    assert [n.port for n in services[0].nodes] == [2]


def test_self_preservation_holds_mass_expiry_and_releases_stragglers() -> None:
    reg, clock, _ = make(default_ttl=10, self_preservation_min_nodes=3)
    leases = [reg.register(r("a", p)).lease_id for p in range(1, 5)]
    clock.now += 11  # every heartbeat stopped at once
    assert reg.expire() == []
    assert reg.self_preservation
    assert reg.poll("", 0).self_preservation
    for lease in leases[:3]:
        reg.heartbeat(lease)
    assert reg.expire() == [("a", "h:4")]
    assert not reg.self_preservation


def test_staggered_deaths_within_one_ttl_still_count_as_at_once() -> None:
    reg, clock, _ = make(default_ttl=9, self_preservation_min_nodes=3)
    leases = []
    for p in range(1, 7):
        leases.append(reg.register(r("a", p)).lease_id)
        clock.now += 1  # last heartbeats spread over a third of the TTL
    clock.now += 3.5  # the first lease is overdue; the others silent for > TTL/2
    assert reg.expire() == []
    assert reg.self_preservation


def test_a_single_death_expires_normally() -> None:
    reg, clock, _ = make(default_ttl=10)
    leases = [reg.register(r("a", p)).lease_id for p in range(1, 5)]
    for _ in range(4):
        clock.now += 3
        for lease in leases[1:]:  # port 1 went quiet, the rest heartbeat every TTL/3
            reg.heartbeat(lease)
    assert reg.expire() == [("a", "h:1")]
    assert not reg.self_preservation


def test_too_few_leases_for_self_preservation() -> None:
    reg, clock, _ = make(default_ttl=10, self_preservation_min_nodes=3)
    reg.register(r("a", 1))
    reg.register(r("a", 2))
    clock.now += 11
    assert len(reg.expire()) == 2
    assert not reg.self_preservation


def test_static_nodes_enter_at_first_probe_and_are_protected() -> None:
    reg, _, _ = make(options={"s": ServiceOptions(strategy="weighted")})
    reg.set_static({"s": [StaticNode("10.0.0.1", 80, weight=2)]})
    assert reg.poll("", 0).services == ()
    assert reg.set_probe_status("s", "10.0.0.1", 80, "up")
    svc = reg.poll("", 0).services[0].service
    assert svc.strategy == "weighted"
    assert svc.nodes[0].status == "up"
    assert svc.nodes[0].weight == 2
    assert reg.set_probe_status("s", "10.0.0.1", 80, "down")
    assert not reg.set_probe_status("s", "10.0.0.1", 80, "down")
    with pytest.raises(Conflict):
        reg.register(r("s", 80, host="10.0.0.1"))
    with pytest.raises(Conflict):
        reg.deregister(NodeAddress(service="s", host="10.0.0.1", port=80))
    # an operator's drain wins over probes; "up" hands control back to them
    reg.update_node(NodeUpdate(service="s", host="10.0.0.1", port=80, status="drain"))
    reg.set_probe_status("s", "10.0.0.1", 80, "up")
    assert reg.poll("", 0).services[0].service.nodes[0].status == "drain"
    reg.update_node(NodeUpdate(service="s", host="10.0.0.1", port=80, status="up"))
    assert reg.poll("", 0).services[0].service.nodes[0].status == "up"


def test_watchers_wake_on_change() -> None:
    import threading

    reg, _, _ = make()
    woke: list[bool] = []
    t = threading.Thread(target=lambda: woke.append(reg.wait_changed(0, timeout=10)))
    t.start()
    reg.register(r("a", 1))
    t.join(10)
    assert woke == [True]
    assert reg.wait_changed(1, timeout=0.01) is False
