"""Weighted round-robin schedules, computed once per service version.

A worker then serves weighted picks by walking the schedule (``schedule[counter % len]``, in
practice ``itertools.cycle``), which is O(1) per pick; nginx's own smooth WRR loops over all
nodes on every pick.

- Exact nginx smooth WRR (5:1:1 -> ``a a b a c a a``) when the period ``P = sum(w) / gcd(w)``
  is small enough to simulate: ``P * n <= 2**18`` (about 10 ms here).
- Otherwise an earliest-deadline-first interleave: node ``i``'s ``j``-th slot has deadline
  ``(2j + 1) / (2 w_i)`` and slots are sorted by (deadline, index). Counts per period still equal
  the weights exactly as long as ``P <= 2**14``.
- Above that, weights are first scaled to sum ``2**14`` by largest remainder (every node keeps at
  least one slot, ties to the lower index), so a node's share is off by at most about one slot in
  16384.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd
from operator import add

__all__ = ["smooth_wrr"]

_EXACT_WORK = 1 << 18
_MAX_PERIOD = 1 << 14


def _nginx(weights: Sequence[int]) -> list[int]:
    n = len(weights)
    total = sum(weights)
    current = [0] * n
    out: list[int] = []
    append = out.append
    for _ in range(total):
        current = list(map(add, current, weights))
        best = max(current)
        i = current.index(best)  # first maximum, as nginx's strict ">" comparison
        current[i] = best - total
        append(i)
    return out


def _edf(weights: Sequence[int]) -> list[int]:
    slots = [((2 * j + 1) / (2 * w), i) for i, w in enumerate(weights) for j in range(w)]
    slots.sort()
    return [i for _, i in slots]


def _scale(weights: Sequence[int], target: int) -> list[int]:
    """Largest-remainder apportionment of about ``target`` slots, at least one per node.

    Each node gets ``max(1, floor(w * target / W))`` and the slots left over go to the largest
    remainders (ties to the lower index), so no node is off by more than one slot.
    """
    total = sum(weights)
    n = len(weights)
    base = [max(1, w * target // total) for w in weights]
    order = sorted(range(n), key=lambda i: (-(weights[i] * target % total), i))
    for i in order[: max(0, target - sum(base))]:
        base[i] += 1
    return base


def smooth_wrr(weights: Sequence[int]) -> list[int]:
    """One period of the weighted round-robin schedule, as indices into ``weights``.

    Weights must be positive. Equal weights give ``0, 1, ..., n-1``.
    """
    if not weights:
        return []
    if any(w <= 0 for w in weights):
        raise ValueError("smooth_wrr: weights must be positive")
    g = gcd(*weights)
    reduced = [w // g for w in weights]
    period = sum(reduced)
    n = len(reduced)
    if period == n:
        return list(range(n))
    if period * n <= _EXACT_WORK:
        return _nginx(reduced)
    if period > max(_MAX_PERIOD, n):
        scaled = _scale(reduced, max(_MAX_PERIOD, n))
        g = gcd(*scaled)
        reduced = [w // g for w in scaled]
        if sum(reduced) * n <= _EXACT_WORK:
            return _nginx(reduced)
    return _edf(reduced)
