"""The ketama ring agrees with uhashring (the oracle) and with libmemcached's point counts."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from uhashring import HashRing

from clustermap.balance import ServicePicker, build_ketama
from clustermap.balance.hashing import ketama_hash, ketama_name
from clustermap.model import Node, Service


def oracle(names: list[str], weights: list[int]) -> HashRing:
    return HashRing(
        nodes={name: {"weight": w} for name, w in zip(names, weights, strict=True)},
        hash_fn="ketama",
    )


NAMES = [f"10.0.3.{i}:11211" for i in range(1, 9)]


@pytest.mark.parametrize("weights", [[1] * 8, [1, 2, 3, 4, 5, 6, 7, 8], [10, 1, 1, 1, 1, 1, 1, 1]])
def test_points_equal_uhashring(weights: list[int]) -> None:
    points, owners = build_ketama(NAMES, weights)
    ring = oracle(NAMES, weights)
    assert points == ring.runtime._keys
    assert [NAMES[i] for i in owners] == [ring.runtime._ring[p] for p in points]
    if weights == [1] * 8:
        assert Counter(owners) == dict.fromkeys(range(8), 160)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=10))
def test_lookups_equal_uhashring(weights: list[int]) -> None:
    names = NAMES[: len(weights)] + [f"cache-{i}.example:11212" for i in range(len(weights) - 8)]
    nodes = tuple(
        Node(name.rsplit(":", 1)[0], int(name.rsplit(":", 1)[1]), weight=w)
        for name, w in zip(names, weights, strict=True)
    )
    picker = ServicePicker(Service("mc", nodes, meta={"hash": "ketama"}))
    canonical = [n.address for n in picker.nodes]
    ring = oracle(canonical, [n.weight for n in picker.nodes])
    keys = [f"session:{i}" for i in range(2000)]
    # Disagreement is possible only for a key whose hash equals a point exactly (p ~ 1e-6 here).
    assert [picker.pick(key=k).address for k in keys] == [ring.get_node(k) for k in keys]


def test_exact_point_hit_ketama_takes_ge_uhashring_takes_gt() -> None:
    """A key named like a point (``"<node>-0"``) hashes exactly onto that node's first point.

    ketama (libketama, libmemcached) takes the first point >= the hash, so the key lands on that
    node; uhashring bisects to the first point strictly greater, i.e. the next point on the ring.
    """
    points, owners = build_ketama(NAMES, [1] * 8)
    ring = oracle(NAMES, [1] * 8)
    nodes = tuple(Node(n.split(":")[0], 11211) for n in NAMES)
    picker = ServicePicker(Service("mc", nodes, meta={"hash": "ketama"}))
    differing = 0
    for index, name in enumerate(NAMES):
        key = f"{name}-0"
        position = points.index(ketama_hash(key))
        assert owners[position] == index
        assert picker.pick(key=key).address == name
        after = NAMES[owners[(position + 1) % len(points)]]
        assert ring.get_node(key) == after
        differing += after != name
    assert differing > 0


def test_libmemcached_style_names_and_float_point_counts() -> None:
    nodes = (Node("mc1", 11211), Node("mc2", 11212))
    assert [ketama_name(n, "libmemcached") for n in nodes] == ["mc1", "mc2:11212"]
    assert [ketama_name(n) for n in nodes] == ["mc1:11211", "mc2:11212"]
    # libmemcached's single-precision arithmetic gives 39 digests (156 points) at 25 equal nodes.
    names = [f"mc{i:02d}" for i in range(25)]
    _, owners = build_ketama(names, [1] * 25, "libmemcached")
    assert set(Counter(owners).values()) == {156}
    _, owners = build_ketama(names, [1] * 25)
    assert set(Counter(owners).values()) == {160}


def test_libmemcached_style_selected_by_meta() -> None:
    nodes = tuple(Node(f"mc{i}", 11211) for i in range(4))
    picker = ServicePicker(Service("mc", nodes, meta={"hash": "ketama_libmemcached"}))
    points, owners = build_ketama([f"mc{i}" for i in range(4)], [1] * 4, "libmemcached")
    key = "user:7"
    h = ketama_hash(key)
    expected = next((owners[i] for i, p in enumerate(points) if p >= h), owners[0])
    assert picker.pick(key=key).host == f"mc{expected}"
