"""ServicePicker: eligibility, panic mode, errors, strategy dispatch, fork offsets, threads."""

from __future__ import annotations

import os
import threading
from collections import Counter

import pytest

from clustermap.balance import ServicePicker
from clustermap.errors import ClusterMapError, NoAvailableNode
from clustermap.model import STRATEGIES, Node, Service


def svc(*nodes: Node, **options: object) -> Service:
    return Service("user-svc", tuple(nodes), **options)  # type: ignore[arg-type]


def up(i: int, weight: int = 1, port: int = 8080) -> Node:
    return Node(f"10.0.0.{i}", port, weight=weight)


def down(i: int) -> Node:
    return Node(f"10.0.1.{i}", 8080, status="down")


def drain(i: int) -> Node:
    return Node(f"10.0.2.{i}", 8080, status="drain")


ALL = (*STRATEGIES, "weighted_random")


def addrs(nodes: object) -> set[str]:
    return {n.address for n in nodes}  # type: ignore[attr-defined]


def pick_all(picker: ServicePicker, count: int = 400) -> set[str]:
    """Addresses picked by every strategy (Node is not hashable: its meta is a mapping)."""
    seen: set[str] = set()
    for strategy in ALL:
        for i in range(count):
            key = f"k{i}" if strategy == "consistent_hash" else None
            seen.add(picker.pick(key=key, strategy=strategy).address)
    return seen


def test_only_healthy_nodes_are_picked() -> None:
    healthy = [up(1), up(2, weight=3)]
    picker = ServicePicker(svc(*healthy, down(1), drain(1), up(3, weight=0)))
    assert addrs(picker.nodes) == addrs(healthy)
    assert not picker.panic
    assert pick_all(picker) == addrs(healthy)


def test_nodes_are_in_canonical_order_and_deduplicated() -> None:
    picker = ServicePicker(svc(up(3), up(1), up(2), Node("10.0.0.1", 8080, weight=5)))
    assert [n.address for n in picker.nodes] == ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
    assert picker.nodes[0].weight == 5  # of two entries for one address the heaviest wins


def test_panic_mode_spreads_over_up_and_down_never_drain_or_zero() -> None:
    nodes = (up(1), up(2), *(down(i) for i in range(7)), drain(1), up(9, weight=0))
    picker = ServicePicker(svc(*nodes, panic_threshold=0.5))
    assert picker.panic
    expected = addrs([up(1), up(2), *(down(i) for i in range(7))])
    assert addrs(picker.nodes) == expected
    assert pick_all(picker, 600) == expected


def test_panic_threshold_not_reached_keeps_healthy_only() -> None:
    nodes = (up(1), up(2), *(down(i) for i in range(7)), drain(1))
    picker = ServicePicker(svc(*nodes, panic_threshold=0.1))  # 2/10 healthy >= 10 %
    assert not picker.panic
    assert addrs(picker.nodes) == addrs([up(1), up(2)])


@pytest.mark.parametrize(
    ("nodes", "threshold", "fragment"),
    [
        ((), 0.0, "has no nodes"),
        ((down(1), drain(1), up(2, weight=0)), 0.0, "1 down, 1 draining, 1 up with weight 0"),
        ((drain(1), drain(2)), 0.9, "panic threshold in effect"),
    ],
)
def test_no_available_node(nodes: tuple[Node, ...], threshold: float, fragment: str) -> None:
    picker = ServicePicker(svc(*nodes, panic_threshold=threshold))  # building never raises
    for strategy in ALL:
        key = "k" if strategy == "consistent_hash" else None
        with pytest.raises(NoAvailableNode, match="'user-svc'") as info:
            picker.pick(key=key, strategy=strategy)
        assert fragment in str(info.value)
        assert "\n" not in str(info.value)
        assert isinstance(info.value, ClusterMapError)
    with pytest.raises(NoAvailableNode):
        picker.pick()
    with pytest.raises(NoAvailableNode):
        picker.pick(key="k")


def test_default_strategy_comes_from_the_service() -> None:
    nodes = (up(1, weight=5), up(2), up(3))
    weighted = ServicePicker(svc(*nodes, strategy="weighted"))
    first = [weighted.pick() for _ in range(7)]
    assert Counter(n.address for n in first) == {
        "10.0.0.1:8080": 5,
        "10.0.0.2:8080": 1,
        "10.0.0.3:8080": 1,
    }
    rr = ServicePicker(svc(*nodes))
    assert rr.default_strategy == "round_robin"
    assert Counter(rr.pick().address for _ in range(9)) == {n.address: 3 for n in nodes}


def test_unknown_default_strategy_falls_back_to_round_robin() -> None:
    nodes = (up(1), up(2))
    picker = ServicePicker(svc(*nodes, strategy="least_request_v9"))
    assert picker.default_strategy == "round_robin"
    assert Counter(picker.pick().address for _ in range(4)) == {n.address: 2 for n in nodes}


def test_key_means_consistent_hash_and_is_stable() -> None:
    nodes = tuple(up(i) for i in range(1, 9))
    picker = ServicePicker(svc(*nodes, strategy="random"))
    for i in range(200):
        key = f"user:{i}"
        node = picker.pick(key=key)
        assert node == picker.pick(key=key) == picker.consistent_hash(key)
        assert node == picker.pick(key=key.encode(), strategy="consistent_hash")
    other = ServicePicker(svc(*reversed(nodes)))
    assert all(other.pick(key=f"user:{i}") == picker.pick(key=f"user:{i}") for i in range(200))


def test_consistent_hash_default_without_key_picks_randomly() -> None:
    nodes = tuple(up(i) for i in range(1, 5))
    picker = ServicePicker(svc(*nodes, strategy="consistent_hash"))
    assert {picker.pick().address for _ in range(400)} == addrs(nodes)
    with pytest.raises(TypeError, match="needs a key"):
        picker.pick(strategy="consistent_hash")


def test_unknown_strategy_and_hash_are_clear_errors() -> None:
    picker = ServicePicker(svc(up(1)))
    with pytest.raises(ValueError, match="unknown strategy 'fastest'"):
        picker.pick(strategy="fastest")
    bad = ServicePicker(svc(up(1), meta={"hash": "crc32"}))
    with pytest.raises(ValueError, match="unknown meta hash='crc32'"):
        bad.pick(key="k")


def test_ketama_selected_by_meta() -> None:
    nodes = tuple(up(i, port=11211) for i in range(1, 5))
    maglev = ServicePicker(svc(*nodes))
    ketama = ServicePicker(svc(*nodes, meta={"hash": "ketama"}))
    keys = [f"user:{i}" for i in range(300)]
    assert {ketama.pick(key=k).address for k in keys} == addrs(nodes)
    assert [ketama.pick(key=k) for k in keys] != [maglev.pick(key=k) for k in keys]


def test_round_robin_cycles_evenly_in_canonical_order() -> None:
    nodes = tuple(up(i) for i in range(1, 11))
    picker = ServicePicker(svc(*reversed(nodes)))
    picks = [picker.round_robin() for _ in range(1000)]
    assert Counter(n.address for n in picks) == {n.address: 100 for n in nodes}
    start = nodes.index(picks[0])
    assert picks[:10] == list(nodes[start:] + nodes[:start])


def test_after_fork_redraws_the_start_offset() -> None:
    nodes = tuple(up(i) for i in range(1, 33))
    picker = ServicePicker(svc(*nodes, strategy="weighted"))
    picker.pick()  # build the weighted schedule too
    firsts_rr, firsts_wrr = set(), set()
    for _ in range(40):
        picker.after_fork()
        firsts_rr.add(picker.round_robin().address)
        firsts_wrr.add(picker.pick().address)
    assert len(firsts_rr) > 5
    assert len(firsts_wrr) > 5


def test_forked_children_start_at_different_nodes() -> None:
    """The parent's picker is inherited; after_fork in each child must not repeat the parent."""
    nodes = tuple(up(i) for i in range(1, 65))
    picker = ServicePicker(svc(*nodes))
    picker.round_robin()
    firsts = []
    for _ in range(6):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                picker.after_fork()
                os.write(write_end, picker.round_robin().address.encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            firsts.append(pipe.read().decode())
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert all(firsts)
    assert len(set(firsts)) >= 3


def test_random_is_uniform_enough() -> None:
    nodes = tuple(up(i) for i in range(1, 5))
    counts = Counter(ServicePicker(svc(*nodes)).random().address for _ in range(20_000))
    assert set(counts) == addrs(nodes)
    assert min(counts.values()) > 4000  # expected 5000 each; 4000 is > 14 sigma away


def test_weighted_random_follows_weights() -> None:
    nodes = (up(1, weight=1), up(2, weight=3))
    picker = ServicePicker(svc(*nodes))
    counts = Counter(picker.weighted_random().address for _ in range(20_000))
    assert 0.70 < counts[nodes[1].address] / 20_000 < 0.80


def test_threads_never_raise_and_pick_only_eligible() -> None:
    nodes = tuple(up(i, weight=i) for i in range(1, 17))
    picker = ServicePicker(svc(*nodes, down(1), drain(1)))
    eligible = addrs(nodes)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    seen: list[Counter[str]] = []
    per_thread = 5000

    def worker(t: int) -> None:
        counts: Counter[str] = Counter()
        try:
            barrier.wait()
            for i in range(per_thread):
                counts[picker.round_robin().address] += 1
                for strategy in ("random", "weighted", "weighted_random"):
                    if picker.pick(strategy=strategy).address not in eligible:
                        raise AssertionError(strategy)
                if picker.pick(key=f"{t}:{i}").address not in eligible:
                    raise AssertionError("consistent_hash")
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
        seen.append(counts)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    total: Counter[str] = sum(seen, Counter())
    # next() on a cycle is one C call under the GIL: not even a skipped or repeated step.
    assert total == {n.address: 8 * per_thread // 16 for n in nodes}


@pytest.mark.parametrize("strategy", ["round_robin", "random", "weighted", "weighted_random"])
def test_strategy_calls_are_the_strategies(strategy: str) -> None:
    """``iters`` (the client's inlined path) serves the same strategy as pick(strategy=...)."""
    nodes = tuple(up(i, weight=i) for i in range(1, 5))
    picker = ServicePicker(svc(*nodes, down(1)))
    counts = Counter(next(picker.iters[strategy]).address for _ in range(10_000))
    assert set(counts) == addrs(nodes)
    if strategy in ("weighted", "weighted_random"):
        assert counts[up(4).address] > 3 * counts[up(1).address]
    assert type(picker.iters[strategy]).__name__ in ("cycle", "chain")  # C, after a lazy build


def test_random_default_is_a_c_level_stream() -> None:
    picker = ServicePicker(svc(*(up(i) for i in range(1, 9)), strategy="random"))
    assert type(picker.default_it).__name__ == "chain"  # next() on it runs no Python code
    assert {picker.pick().address for _ in range(500)} == {up(i).address for i in range(1, 9)}
