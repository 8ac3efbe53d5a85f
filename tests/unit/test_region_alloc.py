"""The allocator against a byte-map model: no overlap, no leak, coalescing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clustermap.region.alloc import Allocator


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=80))
def test_alloc_free_matches_a_model(ops: list[tuple[bool, int]]) -> None:
    a = Allocator(100, 1100)
    live: dict[int, int] = {}
    for do_alloc, n in ops:
        size = n * 8
        if do_alloc or not live:
            off = a.alloc(size)
            if off is None:
                assert a.largest_free < size
                continue
            assert off >= 100
            assert off + size <= 1100
            for o, s in live.items():
                assert off + size <= o or o + s <= off, "overlapping allocations"
            live[off] = size
        else:
            off = sorted(live)[n % len(live)]
            a.free(off, live.pop(off))
        assert a.free_bytes == 1000 - sum(live.values())
    for off, size in list(live.items()):
        a.free(off, size)
    assert a.free_bytes == a.largest_free == 1000  # fully coalesced


def test_derived_from_used_extents() -> None:
    a = Allocator(0, 100, used=[(10, 10), (50, 20)])
    assert a.free_bytes == 70
    assert a.alloc(30) == 20  # first fit: the hole between the two extents
    assert a.alloc(30) == 70
    assert a.alloc(11) is None
    assert a.alloc(10) == 0


def test_double_free_and_overlap_are_refused() -> None:
    a = Allocator(0, 100)
    off = a.alloc(10)
    assert off == 0
    a.free(0, 10)
    with pytest.raises(ValueError, match="double free"):
        a.free(0, 10)
    with pytest.raises(ValueError, match="overlaps"):
        Allocator(0, 100, used=[(0, 20), (10, 5)])
