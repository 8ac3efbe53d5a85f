"""Property: whatever the history, a subscriber following polls ends with the server's map.

Random registrations, deregistrations, overrides and expiries, with subscribers polling from
random points (including stale revisions beyond a small change log and foreign epochs): after
applying each answer the subscriber's map equals the server's and the checksum matches.
"""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from clustermap.checksum import map_checksum, service_digest
from clustermap.server.registry import DELTA, FULL, NOT_MODIFIED, NotFound, Registry
from clustermap.server.store import MemoryStore
from clustermap.server.validation import NodeAddress, NodeUpdate, Registration

SERVICES = ["a", "b", "c"]

op = st.one_of(
    st.tuples(st.just("reg"), st.sampled_from(SERVICES), st.integers(1, 4), st.integers(0, 3)),
    st.tuples(st.just("dereg"), st.sampled_from(SERVICES), st.integers(1, 4), st.just(0)),
    st.tuples(st.just("set"), st.sampled_from(SERVICES), st.integers(1, 4), st.integers(0, 2)),
    st.tuples(st.just("tick"), st.just(""), st.just(0), st.integers(1, 12)),
    st.tuples(st.just("poll"), st.sampled_from(["", "x"]), st.integers(0, 3), st.just(0)),
)


def _host(port: int) -> str:
    """Hosts whose order is not the ports' (nodes are published sorted by host, then port)."""
    return f"h{port % 3}"


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=60), st.integers(1, 6))
def test_subscribers_converge(ops, log_size) -> None:
    clock = Clock()
    reg = Registry(
        MemoryStore(epoch="E", clock=clock),
        log_size=log_size,
        default_ttl=10,
        warmup=0,
        self_preservation_threshold=1.0,
        clock=clock,
    )
    subs = [{"epoch": "", "revision": 0, "map": {}} for _ in range(4)]
    history: list[int] = [0]
    for kind, svc, port, arg in ops:
        if kind == "reg":
            reg.register(Registration(service=svc, host=_host(port), port=port, weight=arg))
        elif kind == "dereg":
            with contextlib.suppress(NotFound):
                reg.deregister(NodeAddress(service=svc, host=_host(port), port=port))
        elif kind == "set":
            status = ("up", "down", "drain")[arg]
            with contextlib.suppress(NotFound):
                reg.update_node(NodeUpdate(service=svc, host=_host(port), port=port, status=status))
        elif kind == "tick":
            clock.now += arg
            reg.expire()
        else:
            sub = subs[port]
            if svc == "x":  # a subscriber from another history, or one far behind
                sub["epoch"], sub["revision"] = "other", history[len(history) // 2]
            names = frozenset({"a", "c"}) if port == 3 else None  # subscriber 3 filters
            ans = reg.poll(sub["epoch"], sub["revision"], names)
            if ans.kind == FULL:
                sub["map"] = {s.service.name: s.service for s in ans.services}
            elif ans.kind == DELTA:
                for name in ans.removed:  # may name services created and removed since
                    sub["map"].pop(name, None)
                sub["map"].update({s.service.name: s.service for s in ans.services})
            else:
                assert ans.kind == NOT_MODIFIED
            sub["epoch"], sub["revision"] = ans.epoch, ans.revision
            _, current = reg.services()
            assert sub["map"] == {s.name: s for s in current if names is None or s.name in names}
            assert map_checksum(service_digest(s) for s in sub["map"].values()) == ans.checksum
        history.append(reg.status().revision)
    published = reg.services()[1]
    for service in published:
        assert list(service.nodes) == sorted(service.nodes, key=lambda n: (n.host, n.port))
    store = reg.store
    assert isinstance(store, MemoryStore)
    assert {(s.name, n.host, n.port) for s in published for n in s.nodes} == set(store._entries)
