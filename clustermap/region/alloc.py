"""First-fit allocator over the region's data area (pure bookkeeping, no I/O).

The writer keeps it in memory only: on open, and after recovering from a writer that died, it is
re-derived from the records the slots point at, so there is no on-disk free list to corrupt.
Freed space may be reused at once: readers validate every record by version and checksum, so a
reader that raced with the reuse retries instead of returning what it read.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

__all__ = ["Allocator"]


class Allocator:
    """Free extents ``[start, end)`` kept sorted and coalesced."""

    def __init__(self, start: int, end: int, used: Iterable[tuple[int, int]] = ()) -> None:
        self.start = start
        self.end = end
        self._starts: list[int] = []
        self._ends: list[int] = []
        pos = start
        for off, size in sorted(used):
            if off < pos or off + size > end:
                raise ValueError(f"extent {off}+{size} overlaps another or leaves [{start}, {end})")
            if off > pos:
                self._starts.append(pos)
                self._ends.append(off)
            pos = off + size
        if pos < end:
            self._starts.append(pos)
            self._ends.append(end)

    @property
    def free_bytes(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    @property
    def largest_free(self) -> int:
        return max((e - s for s, e in zip(self._starts, self._ends, strict=True)), default=0)

    def alloc(self, size: int) -> int | None:
        """The offset of ``size`` free bytes (first fit), or None when no extent is large enough."""
        for i, (s, e) in enumerate(zip(self._starts, self._ends, strict=True)):
            if e - s >= size:
                if e - s == size:
                    del self._starts[i], self._ends[i]
                else:
                    self._starts[i] = s + size
                return s
        return None

    def free(self, off: int, size: int) -> None:
        """Return an extent; it merges with free neighbours."""
        end = off + size
        if off < self.start or end > self.end:
            raise ValueError(f"extent {off}+{size} is outside [{self.start}, {self.end})")
        i = bisect.bisect_left(self._starts, off)
        if (i < len(self._starts) and self._starts[i] < end) or (i > 0 and self._ends[i - 1] > off):
            raise ValueError(f"double free of extent {off}+{size}")
        merge_left = i > 0 and self._ends[i - 1] == off
        merge_right = i < len(self._starts) and self._starts[i] == end
        if merge_left and merge_right:
            self._ends[i - 1] = self._ends[i]
            del self._starts[i], self._ends[i]
        elif merge_left:
            self._ends[i - 1] = end
        elif merge_right:
            self._starts[i] = off
        else:
            self._starts.insert(i, off)
            self._ends.insert(i, end)
