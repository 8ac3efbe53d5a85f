"""The region's byte layout: pure encode/decode, no I/O.

``docs/region-format.md`` is the normative description; this docstring is its summary. All
integers are little-endian.

File::

    [header page: 4096 B][slot table: slot_count x 16 B][data area: records, 64-B aligned]

Header (static fields are written once, before the file is renamed into place)::

    off  size  field
    0    8     magic b"CLMAPRGN"
    8    4     format version (u32) = 1
    12   4     header size (u32) = 4096
    16   8     file size in bytes (u64)
    24   8     slot table offset (u64) = 4096
    32   4     slot count (u32)
    36   4     reserved (0)
    40   8     data area offset (u64)
    48   8     created, wall-clock ns (u64)
    56   8     file id (u64, random; tells one file incarnation from the next)
    64   64    robust process-shared pthread mutex (writers only)
    -- live words: each an aligned 8-byte word, stored whole, meaningful alone --
    128  8     generation: bumped at the end of every publish; bit 63 = RETIRED
    136  8     last successful sync, wall-clock ns
    144  8     writer pid
    152  8     pending transaction: offset of a committed txn record, 0 if none

Slot ``i`` (16 bytes at ``slot_table + 16*i``)::

    0  8  version: generation of the record's publish, 0 = empty slot; bit 63 = RETIRED
    8  8  offset of the record in the file

Slot 0 holds the meta record, slot 1 the directory, slots 2.. one service each.

Record (immutable once its slot points at it)::

    0   4  kind (u32): 1 meta, 2 directory, 3 service, 4 txn, 5 table
    4   4  payload length (u32)
    8   8  version (u64): equals the slot version that points at it
    16  8  checksum (u64): xxh3_64(payload, seed=version)
    24  .. payload (msgpack)

A reader trusts a record only if kind, version (== the slot version it read) and checksum all
match, so a record overwritten, half-written or seen out of order is retried, never returned.

A service record may be followed, at ``off + align64(24 + n)``, by a **table** record (kind 5,
same version) holding the service's Maglev table: no slot points at it, it lives and dies with
its service record. Payload (binary)::

    0   4  b"MGLV"
    4   4  table size M (u32)
    8   4  node count (u32): the eligible nodes the table indexes, in canonical order
    12  4  entry width in bytes (u32): 1 if node count <= 256, else 2
    16  8  nodes digest (u64): balance.hashing.maglev_digest of those nodes
    24  .. M entries (u8 or u16), node indices

Readers that do not know kind 5 never see it (the service record's length excludes it).
More table records of the same version may follow the first, each at the 64-byte boundary
after the previous one (at most :data:`MAX_TABLE_RECORDS` in all): the tables of the service's
declared subsets. A reader finds the one it wants by node count and nodes digest.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from mmap import mmap
from typing import Any, Final, overload

import msgpack
import xxhash

from clustermap.errors import CorruptRegion
from clustermap.model import (
    STATUSES,
    STRATEGIES,
    Ejection,
    Node,
    Overlay,
    Service,
    SlowStart,
    Trial,
)

__all__ = [
    "DATA_ALIGN",
    "FORMAT_VERSION",
    "GENERATION_OFF",
    "HEADER_SIZE",
    "KIND_DIRECTORY",
    "KIND_META",
    "KIND_SERVICE",
    "KIND_TABLE",
    "KIND_TXN",
    "LAST_SYNC_OFF",
    "MAGIC",
    "MAX_TABLE_RECORDS",
    "MUTEX_OFF",
    "MUTEX_SIZE",
    "RECORD_HEADER",
    "RETIRED",
    "SLOT_DIRECTORY",
    "SLOT_META",
    "SLOT_SIZE",
    "TXN_OFF",
    "WRITER_PID_OFF",
    "FileHeader",
    "Meta",
    "align",
    "decode_directory",
    "decode_meta",
    "decode_service",
    "decode_table",
    "decode_txn",
    "encode_directory",
    "encode_header",
    "encode_meta",
    "encode_record",
    "encode_service",
    "encode_table",
    "encode_txn",
    "parse_header",
    "parse_record_header",
    "table_payload",
    "table_records",
    "verify_payload",
    "with_table",
]

MAGIC: Final = b"CLMAPRGN"
FORMAT_VERSION: Final = 1
HEADER_SIZE: Final = 4096
MUTEX_OFF: Final = 64
MUTEX_SIZE: Final = 64
GENERATION_OFF: Final = 128
LAST_SYNC_OFF: Final = 136
WRITER_PID_OFF: Final = 144
TXN_OFF: Final = 152
SLOT_SIZE: Final = 16
DATA_ALIGN: Final = 64
RETIRED: Final = 1 << 63

SLOT_META: Final = 0
SLOT_DIRECTORY: Final = 1
FIRST_SERVICE_SLOT: Final = 2

KIND_META: Final = 1
KIND_DIRECTORY: Final = 2
KIND_SERVICE: Final = 3
KIND_TXN: Final = 4
KIND_TABLE: Final = 5

_STATIC = struct.Struct("<8sIIQQI4xQQQ")  # magic .. file id: 64 bytes
_TABLE = struct.Struct("<4sIIIQ")  # magic, size, node count, width, nodes digest
TABLE_MAGIC: Final = b"MGLV"
#: Table records one service record may carry: its whole table and up to 16 subsets' tables.
MAX_TABLE_RECORDS: Final = 17
RECORD_HEADER: Final = struct.Struct("<IIQQ")  # kind, length, version, checksum
MAX_PAYLOAD: Final = (1 << 32) - 1

assert _STATIC.size == 64
assert RECORD_HEADER.size == 24


def align(n: int, to: int = DATA_ALIGN) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True, slots=True)
class FileHeader:
    """The static part of the header, fixed for the life of one file."""

    file_size: int
    slot_table: int
    slot_count: int
    data_offset: int
    created_ns: int
    file_id: int


def encode_header(h: FileHeader) -> bytes:
    """The first 64 bytes of a new region file."""
    return _STATIC.pack(
        MAGIC,
        FORMAT_VERSION,
        HEADER_SIZE,
        h.file_size,
        h.slot_table,
        h.slot_count,
        h.data_offset,
        h.created_ns,
        h.file_id,
    )


def parse_header(buf: bytes, actual_size: int) -> FileHeader:
    """Validate the static header against the file's real size; raise :class:`CorruptRegion`."""
    if len(buf) < _STATIC.size or actual_size < HEADER_SIZE:
        raise CorruptRegion(f"truncated region: {actual_size} bytes, a header needs {HEADER_SIZE}")
    magic, version, header_size, file_size, slot_table, slot_count, data_offset, created, fid = (
        _STATIC.unpack_from(buf, 0)
    )
    if magic != MAGIC:
        raise CorruptRegion("not a ClusterMap region (bad magic)")
    if version != FORMAT_VERSION:
        raise CorruptRegion(
            f"region format version {version} is not supported (this reader knows "
            f"{FORMAT_VERSION}); upgrade the client or the sidecar so both agree"
        )
    if header_size != HEADER_SIZE or slot_table != HEADER_SIZE:
        raise CorruptRegion(f"bad header geometry (header {header_size}, slots at {slot_table})")
    if file_size != actual_size:
        raise CorruptRegion(f"region size {actual_size} != {file_size} recorded in its header")
    if slot_count < FIRST_SERVICE_SLOT or data_offset != align(
        slot_table + slot_count * SLOT_SIZE, DATA_ALIGN
    ):
        raise CorruptRegion(f"bad slot table ({slot_count} slots, data at {data_offset})")
    if data_offset > file_size:
        raise CorruptRegion("slot table runs past the end of the region")
    return FileHeader(file_size, slot_table, slot_count, data_offset, created, fid)


def checksum(payload: bytes | memoryview, version: int) -> int:
    return xxhash.xxh3_64_intdigest(payload, seed=version)


def encode_record(kind: int, version: int, payload: bytes) -> bytes:
    """A complete record (header + payload), ready to copy into the data area."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"record payload of {len(payload)} bytes exceeds 4 GiB")
    return RECORD_HEADER.pack(kind, len(payload), version, checksum(payload, version)) + payload


def parse_record_header(buf: bytes | memoryview) -> tuple[int, int, int, int]:
    """(kind, length, version, checksum) of a record header."""
    kind, length, version, digest = RECORD_HEADER.unpack_from(buf, 0)
    return kind, length, version, digest


def verify_payload(payload: bytes | memoryview, version: int, expected: int) -> bool:
    return checksum(payload, version) == expected


# -- payloads -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Meta:
    """Map-wide state the sidecar publishes with each update.

    ``source`` is ``"server"`` or ``"snapshot"`` (warm start from disk). ``protected`` means the
    sidecar is holding back an update it judged destructive; ``reason`` says why.
    """

    revision: int = 0
    epoch: str = ""
    source: str = "server"
    stale: bool = False
    protected: bool = False
    reason: str = ""
    server: str = ""
    counters: Mapping[str, int] = field(default_factory=dict)
    #: Services whose latest version from the server the sidecar could not accept (name ->
    #: reason): they keep their last good nodes. Absent from records of older writers.
    quarantined: Mapping[str, str] = field(default_factory=dict)
    #: How the sidecar follows the server: "poll", or "watch" while its stream is up (then
    #: ``stream_since_ns`` is the wall clock the stream opened at). Absent from older writers.
    mode: str = ""
    stream_since_ns: int = 0
    #: The machine's zone (``cm-sidecar --zone``), "" if none; workers keep picks in it
    #: (docs/routing.md). Absent from older writers; older readers ignore it.
    zone: str = ""
    #: Hashed services some of whose declared subsets get no published table (over a limit,
    #: docs/routing.md): workers build those. Absent from older writers; older readers ignore it.
    tables_capped: int = 0


def encode_meta(m: Meta) -> bytes:
    return _pack(
        {
            "revision": m.revision,
            "epoch": m.epoch,
            "source": m.source,
            "stale": m.stale,
            "protected": m.protected,
            "reason": m.reason,
            "server": m.server,
            "counters": dict(m.counters),
            "quarantined": dict(m.quarantined),
            "mode": m.mode,
            "stream_since_ns": m.stream_since_ns,
            "zone": m.zone,
            "tables_capped": m.tables_capped,
        }
    )


def _unpack(payload: bytes | memoryview, what: str) -> Any:
    try:
        return msgpack.unpackb(payload, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise CorruptRegion(f"undecodable {what} record: {exc}") from None


def decode_meta(payload: bytes | memoryview) -> Meta:
    d = _unpack(payload, "meta")
    try:
        counters = d.get("counters", {})
        if not all(isinstance(k, str) and type(v) is int for k, v in counters.items()):
            raise TypeError("counters must map names to integers")
        quarantined = d.get("quarantined", {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in quarantined.items()):
            raise TypeError("quarantined must map names to reasons")
        return Meta(
            revision=_int(d["revision"]),
            epoch=_str(d["epoch"]),
            source=_str(d["source"]),
            stale=bool(d["stale"]),
            protected=bool(d["protected"]),
            reason=_str(d["reason"]),
            server=_str(d.get("server", "")),
            counters=counters,
            quarantined=quarantined,
            mode=_str(d.get("mode", "")),
            stream_since_ns=_int(d.get("stream_since_ns", 0)),
            zone=_str(d.get("zone", "")),
            tables_capped=_int(d.get("tables_capped", 0)),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise CorruptRegion(f"malformed meta record: {exc}") from None


def encode_directory(slots: Mapping[str, int]) -> bytes:
    return _pack(dict(slots))


def decode_directory(payload: bytes | memoryview, slot_count: int) -> dict[str, int]:
    d = _unpack(payload, "directory")
    if not isinstance(d, dict) or not all(
        isinstance(k, str) and type(v) is int and FIRST_SERVICE_SLOT <= v < slot_count
        for k, v in d.items()
    ):
        raise CorruptRegion("malformed directory record")
    return d


def encode_service(s: Service) -> bytes:
    """``[name, revision, strategy, panic, meta, [[host, port, weight, status, meta], ...]]``,
    then, when the sidecar has feedback verdicts, ``[ids, [[position, until_ns, reason], ...]]``
    with ``ids`` packed as little-endian int32s (one per node, -1: none), then, when nodes are
    in slow start, ``[window_ns, aggression, min_weight, [[position, since_ns], ...]]`` (with a
    7th element of ids -1 if there is no overlay: older readers ignore the 8th), then, when
    nodes are half-open, ``[[position, owner, until_ns], ...]`` (with a neutral 8th, a ramp of
    no node, if none is running: older readers ignore the 9th).
    """
    doc: list[object] = [
        s.name,
        s.revision,
        s.strategy,
        float(s.panic_threshold),
        dict(s.meta),
        [[n.host, n.port, n.weight, n.status, dict(n.meta)] for n in s.nodes],
    ]
    overlay = s.overlay
    if overlay is None and s.slow_start is not None:  # the 8th element needs a 7th
        overlay = Overlay((-1,) * len(s.nodes))
    if overlay is not None:
        ids = struct.pack(f"<{len(overlay.ids)}i", *overlay.ids)
        doc.append([ids, [list(e) for e in overlay.ejected]])
    trials = overlay.trials if overlay is not None else ()
    if s.slow_start is not None:
        r = s.slow_start
        doc.append(
            [r.window_ns, float(r.aggression), float(r.min_weight), [list(p) for p in r.since]]
        )
    elif trials:  # the 9th element needs an 8th
        doc.append([1, 1.0, 0.0, []])
    if trials:
        doc.append([list(t) for t in trials])
    return _pack(doc)


_LITTLE: Final = sys.byteorder == "little" and array.array("i").itemsize == 4


def _unpack_i32(raw: bytes, count: int) -> tuple[int, ...]:
    return struct.unpack(f"<{count}i", raw)


def _decode_overlay(raw: Any, count: int) -> Overlay:
    ids_raw, ejected_raw = raw
    # Packed int32s, decoded and checked in C: this runs on every decode of a changed service,
    # in every worker.
    if not isinstance(ids_raw, bytes) or len(ids_raw) != 4 * count:
        raise TypeError("bad overlay ids")
    ids = tuple(array.array("i", ids_raw)) if _LITTLE else tuple(_unpack_i32(ids_raw, count))
    if min(ids, default=0) < -1:
        raise TypeError("bad overlay ids")
    ejected = tuple(Ejection(*e) for e in ejected_raw)
    for e in ejected:
        if not (
            type(e.position) is int
            and 0 <= e.position < count
            and type(e.until_ns) is int
            and isinstance(e.reason, str)
        ):
            raise TypeError(f"bad ejection {e!r:.80}")
    return Overlay(ids, ejected)


def _decode_trials(raw: Any, overlay: Overlay | None, count: int) -> Overlay | None:
    trials = tuple(Trial(*t) for t in raw)
    for t in trials:
        if not (
            type(t.position) is int
            and 0 <= t.position < count
            and type(t.owner) is int
            and type(t.until_ns) is int
        ):
            raise TypeError(f"bad trial {t!r:.80}")
    if overlay is None or not trials:
        return overlay
    return Overlay(overlay.ids, overlay.ejected, trials)


def _decode_slow_start(raw: Any, count: int) -> SlowStart:
    window_ns, aggression, min_weight, since_raw = raw
    since = tuple((p, t) for p, t in since_raw)
    if not (
        type(window_ns) is int
        and window_ns > 0
        and isinstance(aggression, float)
        and aggression > 0
        and isinstance(min_weight, float)
        and 0.0 <= min_weight <= 1.0
        and all(type(p) is int and 0 <= p < count and type(t) is int for p, t in since)
    ):
        raise TypeError("bad slow start")
    return SlowStart(window_ns, aggression, min_weight, since)


def decode_service(payload: bytes | memoryview) -> Service:
    """Decode and check a service record; anything off raises :class:`CorruptRegion`."""
    d = _unpack(payload, "service")
    try:
        name, revision, strategy, panic, meta, raw_nodes = d[:6]
        nodes = tuple([Node(*n) for n in raw_nodes])
        # Trailing elements are additions a reader may not know; the 7th is the overlay.
        overlay = _decode_overlay(d[6], len(nodes)) if len(d) > 6 else None
        ramp = _decode_slow_start(d[7], len(nodes)) if len(d) > 7 else None  # 8th: slow start
        if ramp is not None and not ramp.since:  # a neutral 8th, written for a 9th
            ramp = None
        if len(d) > 8:  # 9th: half-open trials
            overlay = _decode_trials(d[8], overlay, len(nodes))
        if not (isinstance(name, str) and type(revision) is int and strategy in STRATEGIES):
            raise TypeError("bad service fields")
        if not isinstance(panic, float) or not 0.0 <= panic <= 1.0 or not isinstance(meta, dict):
            raise TypeError("bad service options")
        for n in nodes:
            if not (
                isinstance(n.host, str)
                and type(n.port) is int
                and type(n.weight) is int
                and n.status in STATUSES
                and isinstance(n.meta, dict)
            ):
                raise TypeError(f"bad node {n!r:.80}")
    except (TypeError, ValueError) as exc:
        raise CorruptRegion(f"malformed service record: {exc}") from None
    return Service(name, nodes, strategy, panic, revision, meta, overlay, ramp)


def encode_table(index: Sequence[int], nodes: int, digest: int) -> bytes:
    """A table payload: ``index[slot]`` (each ``< nodes``) as u8 or u16 entries, little-endian."""
    width = 1 if nodes <= 256 else 2
    entries = array.array("B" if width == 1 else "H", index)
    if width == 2 and sys.byteorder == "big":
        entries.byteswap()
    return _TABLE.pack(TABLE_MAGIC, len(index), nodes, width, digest) + entries.tobytes()


@overload
def decode_table(payload: memoryview) -> tuple[memoryview, int, int, int]: ...
@overload
def decode_table(payload: bytes) -> tuple[bytes, int, int, int]: ...


def decode_table(payload: bytes | memoryview) -> tuple[bytes | memoryview, int, int, int]:
    """``(entries, width, node count, nodes digest)`` of a verified table payload; ``entries``
    is a slice of ``payload`` (a view stays a view). Raises :class:`CorruptRegion`."""
    if len(payload) < _TABLE.size:
        raise CorruptRegion("truncated table record")
    magic, size, nodes, width, digest = _TABLE.unpack_from(payload, 0)
    if magic != TABLE_MAGIC or width not in (1, 2) or len(payload) != _TABLE.size + size * width:
        raise CorruptRegion("malformed table record")
    if nodes > (1 << (8 * width)) or nodes == 0:
        raise CorruptRegion(f"table record: {nodes} nodes in {width}-byte entries")
    return payload[_TABLE.size :], width, nodes, digest


def with_table(service_record: bytes, table_record: bytes) -> bytes:
    """A service record followed by its table record at the next 64-byte boundary."""
    return service_record + bytes(align(len(service_record)) - len(service_record)) + table_record


@overload
def table_payload(buf: memoryview, off: int, version: int, limit: int) -> memoryview | None: ...
@overload
def table_payload(buf: bytes | mmap, off: int, version: int, limit: int) -> bytes | None: ...


def table_payload(
    buf: bytes | memoryview | mmap, off: int, version: int, limit: int
) -> bytes | memoryview | None:
    """The verified payload of the table record attached to the service record at ``off``
    (which must have ``version``), or None: no table there, or not one of this version.

    ``buf`` is the file's bytes (an mmap slices into copies, a memoryview into views) and
    ``limit`` its size. Nothing is retried: the caller has already verified the service record,
    and a table that does not verify is absent (an older writer may have reused its space).
    """
    hdr = RECORD_HEADER.size
    if not 0 <= off <= limit - hdr:
        return None
    kind, length, rversion, _ = parse_record_header(buf[off : off + hdr])
    if kind != KIND_SERVICE or rversion != version:
        return None
    t = off + align(hdr + length)
    if t > limit - hdr:
        return None
    kind, length, rversion, digest = parse_record_header(buf[t : t + hdr])
    if kind != KIND_TABLE or rversion != version or t + hdr + length > limit:
        return None
    payload = buf[t + hdr : t + hdr + length]
    return payload if verify_payload(payload, version, digest) else None


def table_records(
    buf: bytes | memoryview | mmap, off: int, version: int, limit: int
) -> list[tuple[int, int, int, int, int]]:
    """The table records attached to the service record at ``off`` (of ``version``), as
    ``(payload offset, length, checksum, node count, nodes digest)``, read from their headers
    and **not verified**: the caller verifies the payload it uses (:func:`verify_payload`).
    The walk stops at the first record that is not a table of this version, or after
    :data:`MAX_TABLE_RECORDS`."""
    hdr = RECORD_HEADER.size
    out: list[tuple[int, int, int, int, int]] = []
    if not 0 <= off <= limit - hdr:
        return out
    kind, length, rversion, _ = parse_record_header(buf[off : off + hdr])
    if kind != KIND_SERVICE or rversion != version:
        return out
    t = off + align(hdr + length)
    while len(out) < MAX_TABLE_RECORDS and t <= limit - hdr - _TABLE.size:
        kind, length, rversion, digest = parse_record_header(buf[t : t + hdr])
        if kind != KIND_TABLE or rversion != version or t + hdr + length > limit:
            break
        if length < _TABLE.size:
            break
        _, _, nodes, _, nodes_digest = _TABLE.unpack_from(buf[t + hdr : t + hdr + _TABLE.size])
        out.append((t + hdr, length, digest, nodes, nodes_digest))
        t += align(hdr + length)
    return out


def encode_txn(generation: int, entries: list[tuple[int, int, int]]) -> bytes:
    """A redo log: the slot stores ``(slot, version, offset)`` that make up one publish."""
    return _pack([generation, entries])


def decode_txn(payload: bytes | memoryview) -> tuple[int, list[tuple[int, int, int]]]:
    d = _unpack(payload, "transaction")
    try:
        generation, entries = d
        out = [(int(s), int(v), int(o)) for s, v, o in entries]
        return int(generation), out
    except (TypeError, ValueError) as exc:
        raise CorruptRegion(f"malformed transaction record: {exc}") from None


def _pack(obj: object) -> bytes:
    out: bytes = msgpack.packb(obj)
    return out


def _int(v: object) -> int:
    if type(v) is not int:
        raise TypeError(f"expected an integer, got {type(v).__name__}")
    return v


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v
