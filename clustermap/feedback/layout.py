"""Byte layout of the two feedback files beside a region: pure encode/parse, no I/O.

``docs/feedback.md`` is the normative description; this is its summary. Integers are
little-endian; a "word" is an aligned 8-byte unsigned integer stored whole.

``<region>.feedback`` — written by workers (one row each), read by the sidecar::

    header (4096 B)
    0   8   magic b"CLMAPFBK"
    8   4   format version (u32) = 3
    12  4   header size (u32) = 4096
    16  4   row count R (u32)
    20  4   entries per row K (u32)
    24  4   row size (u32) = 64 + 40 * K
    28  4   reserved (0)
    32  8   file id (u64, random)
    row r at 4096 + r * row size:
    0   8   owner word: (nonce << 32) | pid while claimed; 0 while being (re)initialised
    8   8   requests in flight through clustermap.http / clustermap.grpc (retry budget)
    16  8   retries in flight (retry budget, :mod:`clustermap.feedback.budget`)
    24  40  reserved (0)
    64  ..  K entries of 5 words:
            0  tag (u64): node id + 1 (0 = unused); written last when the entry is taken;
               entries are taken in order, so the first unused one ends the row
            1  calls (f64): an integer, in flight + 65536 x successes; below 2**53, the
               successes modulo 2**36 (the writer subtracts 2**52 when it reaches it)
            2  latency (f64): seconds, the sum of the latencies given to ``report()``
               (``call()`` reads no clock: the sidecar derives its calls' latency from the
               calls in flight, :mod:`clustermap.sidecar.latency`)
            3  failures (u64, mod 2**64)
            4  streak (u64): bits 32-63 the successes (mod 2**32) when the streak began, 0-31
               failures since (a streak whose success count is not the current one: 0)

A worker owns a row while it holds an OFD write lock on the row's bytes (the kernel drops it when
the process dies). Only the owner writes the row, one whole word at a time. A successful call is
one store into the ``calls`` word when it starts and one when it ends: a float64 word, because
its arithmetic costs a worker least (no multi-digit integers; docs/performance.md §6). Counters
wrap, and the sidecar reads differences between two sweeps. Version 3 differs from 2 in meaning
only: a version 2 worker also added its ``call()`` latencies, which the sidecar now measures.
Everything in this file is untrusted input for the sidecar: :func:`parse_row` clamps or rejects
what a buggy or hostile worker may have written.

``<region>.load`` — written by the sidecar only, mapped read-only by workers::

    0   8   magic b"CLMAPLOD"
    8   4   format version (u32) = 3
    12  4   header size (u32) = 4096
    16  4   capacity: number of node ids (u32)
    20  4   reserved (0)
    24  8   file id (u64, random)
    32  8   sweep word: wall clock (ns) of the sidecar's last sweep of the rows
    40  8   0 (the calls in flight of a node without an id)
    48  8   1 (the latency of a node without an id)
    word at 4096 + 8 * id: calls in flight to node ``id``, summed over every live row
    word at 4096 + 8 * (capacity + id): node ``id``'s peak-EWMA latency in µs, at least 1
        (:mod:`clustermap.sidecar.latency`)
    word at 4096 + 8 * (2 * capacity + id): node ``id``'s cost for least_request, the expected
        wait (calls in flight + 1) x latency, at least 1: one load per candidate in a worker
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

__all__ = [
    "CALLS_WRAP",
    "ENTRY_WORDS",
    "FEEDBACK_MAGIC",
    "HEADER_SIZE",
    "LOAD_MAGIC",
    "MAX_EJECTION_S",
    "MAX_ENTRIES",
    "MAX_IDS",
    "MAX_IN_FLIGHT",
    "MAX_ROWS",
    "OK_DONE",
    "OK_ONE",
    "ONE_OFF",
    "ROW_HEADER",
    "SWEEP_OFF",
    "WORD_MASK",
    "ZERO_OFF",
    "Entry",
    "FeedbackHeader",
    "LayoutError",
    "LoadHeader",
    "encode_feedback_header",
    "encode_load_header",
    "feedback_size",
    "load_size",
    "owner_pid",
    "owner_word",
    "parse_feedback_header",
    "parse_load_header",
    "parse_row",
    "row_offset",
    "successes",
]

FEEDBACK_MAGIC: Final = b"CLMAPFBK"
LOAD_MAGIC: Final = b"CLMAPLOD"
VERSION: Final = 3
HEADER_SIZE: Final = 4096
ROW_HEADER: Final = 64
ENTRY_WORDS: Final = 5
ENTRY_SIZE: Final = ENTRY_WORDS * 8
SWEEP_OFF: Final = 32
#: Offsets of header words of the load file that always hold 0 and 1: the calls in flight and
#: the latency of a node without an id.
ZERO_OFF: Final = 40
ONE_OFF: Final = 48
#: Upper bounds on the geometry a reader accepts (a header is untrusted too).
MAX_ROWS: Final = 65536
MAX_ENTRIES: Final = 4096
MAX_IDS: Final = 1 << 24
#: The longest ejection anyone honours: a reader treats a later ``until`` as garbage (expired).
MAX_EJECTION_S: Final = 3600
#: Fields of the ``calls`` word (a float64 holding an integer).
IN_FLIGHT_MASK: Final = 0xFFFF
OK_SHIFT: Final = 16
OK_MASK: Final = (1 << 36) - 1
#: One success in the ``calls`` word.
OK_ONE: Final = float(1 << OK_SHIFT)
#: Added to ``calls`` when a call ends well: one success, one call fewer in flight.
OK_DONE: Final = OK_ONE - 1.0
#: The writer subtracts this from ``calls`` when it reaches it: successes wrap modulo 2**36,
#: and every value stays an exact integer (below 2**53) even with calls in flight added.
CALLS_WRAP: Final = float(1 << 52)
_CALLS_LIMIT: Final = float(1 << 53)
WORD_MASK: Final = (1 << 64) - 1
#: Calls in flight per (worker, node) that the field holds; more is garbage, not load.
MAX_IN_FLIGHT: Final = IN_FLIGHT_MASK

_INF: Final = float("inf")
_FB = struct.Struct("<8sIIIIII Q")
_LOAD = struct.Struct("<8sIIII Q Q")
_ENTRIES_CACHE: dict[int, struct.Struct] = {}

assert _FB.size == 40
assert _LOAD.size == 40


class LayoutError(ValueError):
    """A header that is not a feedback (or load) file this reader understands."""


@dataclass(frozen=True, slots=True)
class FeedbackHeader:
    rows: int
    entries: int
    file_id: int

    @property
    def row_size(self) -> int:
        return ROW_HEADER + ENTRY_SIZE * self.entries


@dataclass(frozen=True, slots=True)
class LoadHeader:
    capacity: int
    file_id: int


class Entry(NamedTuple):
    """One (worker, node) counter set, as read from a row: ``ok`` modulo 2**36, ``failed``
    modulo 2**64, ``streak`` failures since this row's last success, ``latency`` the seconds
    reported with ``report()``."""

    node_id: int
    in_flight: int
    ok: int
    failed: int
    streak: int
    latency: float


def owner_word(nonce: int, pid: int) -> int:
    """A row's owner word: ``(nonce << 32) | pid``, ``nonce`` > 0 so it is never 0."""
    return nonce << 32 | (pid & 0xFFFF_FFFF)


def owner_pid(owner: int) -> int:
    """The pid in a row's owner word (cmctl shows which process holds a half-open trial)."""
    return owner & 0xFFFF_FFFF


def successes(calls: float) -> int:
    """The successes field of a ``calls`` word (modulo 2**36)."""
    return (int(calls) >> OK_SHIFT) & OK_MASK


def feedback_size(rows: int, entries: int) -> int:
    return HEADER_SIZE + rows * (ROW_HEADER + ENTRY_SIZE * entries)


def load_size(capacity: int) -> int:
    return HEADER_SIZE + 24 * capacity


def row_offset(header: FeedbackHeader, row: int) -> int:
    return HEADER_SIZE + row * header.row_size


def encode_feedback_header(rows: int, entries: int, file_id: int) -> bytes:
    row_size = ROW_HEADER + ENTRY_SIZE * entries
    return _FB.pack(FEEDBACK_MAGIC, VERSION, HEADER_SIZE, rows, entries, row_size, 0, file_id)


def parse_feedback_header(buf: bytes, actual_size: int) -> FeedbackHeader:
    """Check a feedback file's header against its real size; :class:`LayoutError` if wrong."""
    if len(buf) < _FB.size:
        raise LayoutError("truncated feedback header")
    magic, version, hsize, rows, entries, row_size, _, file_id = _FB.unpack_from(buf, 0)
    if magic != FEEDBACK_MAGIC:
        raise LayoutError("not a ClusterMap feedback file (bad magic)")
    if version != VERSION or hsize != HEADER_SIZE:
        raise LayoutError(f"feedback format version {version} is not supported")
    if not (0 < rows <= MAX_ROWS and 0 < entries <= MAX_ENTRIES):
        raise LayoutError(f"bad feedback geometry ({rows} rows of {entries} entries)")
    if row_size != ROW_HEADER + ENTRY_SIZE * entries:
        raise LayoutError(f"bad feedback row size {row_size}")
    if actual_size < feedback_size(rows, entries):
        raise LayoutError(f"feedback file truncated ({actual_size} bytes)")
    return FeedbackHeader(rows, entries, file_id)


def encode_load_header(capacity: int, file_id: int) -> bytes:
    return _LOAD.pack(LOAD_MAGIC, VERSION, HEADER_SIZE, capacity, 0, file_id, 0) + struct.pack(
        "<QQ", 0, 1
    )


def parse_load_header(buf: bytes, actual_size: int) -> LoadHeader:
    if len(buf) < _LOAD.size:
        raise LayoutError("truncated load header")
    magic, version, hsize, capacity, _, file_id, _ = _LOAD.unpack_from(buf, 0)
    if magic != LOAD_MAGIC:
        raise LayoutError("not a ClusterMap load file (bad magic)")
    if version != VERSION or hsize != HEADER_SIZE:
        raise LayoutError(f"load format version {version} is not supported")
    if not 0 < capacity <= MAX_IDS or actual_size < load_size(capacity):
        raise LayoutError(f"bad load geometry ({capacity} ids, {actual_size} bytes)")
    return LoadHeader(capacity, file_id)


def _entries_struct(entries: int) -> struct.Struct:
    s = _ENTRIES_CACHE.get(entries)
    if s is None:
        s = _ENTRIES_CACHE[entries] = struct.Struct("<" + "QddQQ" * entries)
    return s


def parse_row(buf: bytes, entries: int, capacity: int) -> tuple[int, list[Entry], int]:
    """(owner word, used entries, entries rejected) of one row, from untrusted bytes.

    Entries are taken in order, so the first unused one (tag 0) ends the row. An entry is
    rejected when its id is outside ``[0, capacity)`` or repeats an earlier entry's id, when its
    ``calls`` is not an integer in ``[0, 2**53)``, or its latency not finite and ``>= 0``. Never
    raises on any content of the right length; a short buffer raises :class:`LayoutError`.
    """
    size = ROW_HEADER + ENTRY_SIZE * entries
    if len(buf) < size:
        raise LayoutError(f"short row: {len(buf)} bytes, need {size}")
    owner = int.from_bytes(buf[0:8], "little")
    words = _entries_struct(entries).unpack_from(buf, ROW_HEADER)
    out: list[Entry] = []
    seen: set[int] = set()
    rejected = 0
    for i in range(0, len(words), ENTRY_WORDS):
        tag = words[i]
        if tag == 0:
            break  # entries are taken in order: the first unused one ends the row
        node_id = tag - 1
        if node_id >= capacity or node_id in seen:
            rejected += 1
            continue
        calls, latency = words[i + 1], words[i + 2]
        # (NaN fails every comparison, so it is rejected too.)
        if not (0.0 <= calls < _CALLS_LIMIT and calls == int(calls) and 0.0 <= latency < _INF):
            rejected += 1
            continue
        seen.add(node_id)
        c = int(calls)
        ok = (c >> OK_SHIFT) & OK_MASK
        streak = words[i + 4]
        out.append(
            Entry(
                node_id,
                c & IN_FLIGHT_MASK,
                ok,
                words[i + 3],
                streak & 0xFFFF_FFFF if streak >> 32 == ok & 0xFFFF_FFFF else 0,
                latency,
            )
        )
    return owner, out, rejected
