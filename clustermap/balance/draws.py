"""Uniform random draws served from batches through C-level iterators.

A random pick that draws one number per call runs a Python frame (``getrandbits`` plus the
rejection test) on every request. Drawing a batch at once and serving it through
``itertools.chain.__next__`` gives exactly the same distribution (the draws are i.i.d. either
way) at about the cost of a round-robin step: the whole pipeline below is made of C callables
(``getrandbits``, ``int.to_bytes``, ``bytes.translate``, ``map``, ``filter``, ``chain``), so a
pick, refill included, never enters Python code. That also makes it atomic under the GIL:
threads and greenlets cannot interleave inside a pick or a refill.

Uniformity is exact, by rejection: for ``n <= 256`` each random byte ``x`` is kept when
``x < floor(256 / n) * n`` and maps to ``x mod n`` (``bytes.translate`` deletes the rejected
bytes and maps the rest in one C pass); for ``n <= 65536`` the same on 16-bit words. Larger
sequences get a per-call draw (:func:`random.randrange`'s method, inlined).

Fork safety: a batch drawn before a fork would repeat in every child, so the caller builds a
new stream after a fork (``ServicePicker.after_fork``); numbers come from the module-level
generator, which CPython reseeds in a forked child.
"""

from __future__ import annotations

import random as _random_module
from collections.abc import Callable, Iterator, Sequence
from itertools import chain, repeat
from typing import Any, Final, TypeVar

__all__ = ["BATCH", "uniform_stream"]

T = TypeVar("T")

#: Draws per refill: large enough that the refill (~1.5 µs) costs a few ns per pick, small
#: enough that a stream holds little memory (a 256-byte or 512-byte buffer).
BATCH: Final = 256

# Bound to the module-level generator, which CPython reseeds in every forked child.
_getrandbits = _random_module.getrandbits
# The C callables of the pipeline, untyped: typeshed cannot follow maps of maps.
_to_bytes: Any = int.to_bytes
_translate: Any = bytes.translate
_view: Any = memoryview
_cast: Any = memoryview.cast
_filter: Any = filter
_map: Any = map
#: Extra random bits of the per-call draw: a draw is rejected (and redrawn) with p < 1/256.
_SLACK_BITS: Final = 8


def uniform_stream(items: Sequence[T]) -> Iterator[T]:
    """An endless iterator whose every ``next()`` is an independent, exactly uniform element of
    ``items``. ``items`` must not be empty, and must not change afterwards."""
    n = len(items)
    if n == 0:
        raise ValueError("uniform_stream: no items")
    getitem = items.__getitem__
    if n <= 256:
        limit = 256 // n * n
        index_of = bytes(i % n for i in range(256))
        rejected = bytes(range(limit, 256))
        raw = map(_to_bytes, map(_getrandbits, repeat(8 * BATCH)), repeat(BATCH), repeat("little"))
        indices = map(_translate, raw, repeat(index_of), repeat(rejected))
        return chain.from_iterable(map(_map, repeat(getitem), indices))
    if n <= 65536:
        limit = 65536 // n * n
        raw = map(
            _to_bytes, map(_getrandbits, repeat(16 * BATCH)), repeat(2 * BATCH), repeat("little")
        )
        words = map(_cast, map(_view, raw), repeat("H"))
        kept = map(_filter, repeat(limit.__gt__), words)
        indices = map(_map, repeat(n.__rmod__), kept)
        return chain.from_iterable(map(_map, repeat(getitem), indices))
    bits = (n - 1).bit_length() + _SLACK_BITS

    return _PerCall(getitem, n, bits, (1 << bits) // n * n)


class _PerCall(Iterator[T]):
    """One rejection draw per ``next()`` (more than 65536 items). A class, not a generator: a
    generator running in one thread raises ValueError when another thread calls it."""

    __slots__ = ("bits", "bound", "getitem", "n")

    def __init__(self, getitem: Callable[[int], T], n: int, bits: int, bound: int) -> None:
        self.getitem, self.n, self.bits, self.bound = getitem, n, bits, bound

    def __next__(self) -> T:
        x = _getrandbits(self.bits)
        while x >= self.bound:
            x = _getrandbits(self.bits)
        return self.getitem(x % self.n)
