"""Weighted round-robin schedules: exact counts, nginx's smooth order, and the large-sum paths."""

from __future__ import annotations

from collections import Counter
from math import gcd

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustermap.balance import smooth_wrr
from clustermap.balance.schedule import _edf, _nginx


def nginx_per_pick(weights: list[int], picks: int) -> list[int]:
    """nginx's ngx_http_upstream_get_peer, one pick at a time (the O(n)-per-pick original)."""
    current = [0] * len(weights)
    total = sum(weights)
    out = []
    for _ in range(picks):
        best = -1
        for i, w in enumerate(weights):
            current[i] += w
            if best == -1 or current[i] > current[best]:
                best = i
        current[best] -= total
        out.append(best)
    return out


def test_5_1_1_is_nginx_sequence() -> None:
    assert "".join("abc"[i] for i in smooth_wrr([5, 1, 1])) == "aabacaa"


def test_equal_weights_are_plain_order() -> None:
    assert smooth_wrr([3, 3, 3, 3]) == [0, 1, 2, 3]


@settings(deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=12))
def test_counts_over_one_period_equal_reduced_weights(weights: list[int]) -> None:
    schedule = smooth_wrr(weights)
    g = gcd(*weights)
    assert len(schedule) == sum(weights) // g
    counts = Counter(schedule)
    assert [counts[i] for i in range(len(weights))] == [w // g for w in weights]


@settings(deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8))
def test_matches_nginx_per_pick_loop(weights: list[int]) -> None:
    g = gcd(*weights)
    reduced = [w // g for w in weights]
    assert smooth_wrr(weights) == nginx_per_pick(reduced, sum(reduced))


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=5000), min_size=60, max_size=80))
def test_large_period_keeps_exact_counts_via_edf(weights: list[int]) -> None:
    """sum * n beyond the exact-simulation budget but period <= 2**14: EDF, still exact."""
    g = gcd(*weights)
    period = sum(weights) // g
    schedule = smooth_wrr(weights)
    counts = Counter(schedule)
    if period <= 1 << 14:
        assert [counts[i] for i in range(len(weights))] == [w // g for w in weights]
    else:
        # apportioned to about 2**14 slots (each node within one slot of its exact share, and at
        # least one), then reduced by the slots' gcd: the only factor that brings the length
        # back into [2**14, 2**14 + n]
        target, length = 1 << 14, len(schedule)
        assert length <= target + len(weights)
        factor = -(-target // length)
        assert target <= length * factor <= target + len(weights)
        for i, w in enumerate(weights):
            share = w * target / sum(weights)
            assert counts[i] >= 1
            if share >= 1:
                assert abs(counts[i] * factor - share) < 1, (i, counts[i], share)


def test_huge_weights_are_scaled_not_simulated() -> None:
    weights = [10**9, 10**9 + 1, 3, 7 * 10**8]
    schedule = smooth_wrr(weights)
    counts = Counter(schedule)
    assert len(schedule) <= 1 << 14
    assert counts[2] == 1  # every node keeps at least one slot
    assert counts[1] >= counts[0] > counts[3] > counts[2]


def test_edf_interleaves_instead_of_bunching() -> None:
    assert _edf([4, 1]) == [0, 0, 1, 0, 0]  # deadlines 1/8, 3/8, (1/2), 5/8, 7/8
    assert _nginx([2, 1]) == [0, 1, 0]


def test_rejects_non_positive_weight() -> None:
    with pytest.raises(ValueError, match="positive"):
        smooth_wrr([1, 0])
