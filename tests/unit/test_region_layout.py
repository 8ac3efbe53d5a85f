"""The region's byte format, from raw bytes: round trips, and garbage that must be refused."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clustermap.errors import CorruptRegion
from clustermap.model import Node, Service
from clustermap.region import layout as L

HDR = L.FileHeader(
    file_size=8192, slot_table=4096, slot_count=64, data_offset=5120, created_ns=1, file_id=7
)


def test_header_round_trip() -> None:
    raw = L.encode_header(HDR)
    assert len(raw) == 64
    assert raw[:8] == b"CLMAPRGN"
    assert L.parse_header(raw, 8192) == HDR


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"NOTAMAP!" + b[8:], "bad magic"),
        (lambda b: b[:8] + struct.pack("<I", 2) + b[12:], "format version 2 is not supported"),
        (lambda b: b[:16] + struct.pack("<Q", 999) + b[24:], "size 8192 != 999"),
        (lambda b: b[:32] + struct.pack("<I", 1) + b[36:], "bad slot table"),
        (lambda b: b[:10], "truncated"),
    ],
)
def test_bad_headers_are_corrupt_with_a_reason(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CorruptRegion, match=message):
        L.parse_header(mutate(L.encode_header(HDR)), 8192)


def test_truncated_file_is_corrupt() -> None:
    with pytest.raises(CorruptRegion, match="truncated"):
        L.parse_header(L.encode_header(HDR), 100)


def test_record_checksum_binds_payload_to_version() -> None:
    rec = L.encode_record(L.KIND_SERVICE, 42, b"payload")
    kind, length, version, digest = L.parse_record_header(rec)
    assert (kind, length, version) == (L.KIND_SERVICE, 7, 42)
    assert L.verify_payload(rec[24:], 42, digest)
    assert not L.verify_payload(rec[24:], 43, digest)
    assert not L.verify_payload(b"paylOad", 42, digest)


nodes = st.builds(
    Node,
    host=st.text(min_size=1, max_size=20),
    port=st.integers(1, 65535),
    weight=st.integers(0, 1000),
    status=st.sampled_from(["up", "down", "drain"]),
    meta=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
services = st.builds(
    Service,
    name=st.text(min_size=1, max_size=30),
    nodes=st.lists(nodes, max_size=10).map(tuple),
    strategy=st.sampled_from(["round_robin", "random", "weighted", "consistent_hash"]),
    panic_threshold=st.floats(0.0, 1.0),
    revision=st.integers(0, 2**63),
    meta=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)


@given(services)
def test_service_round_trip(svc: Service) -> None:
    assert L.decode_service(L.encode_service(svc)) == svc


def test_meta_round_trip() -> None:
    m = L.Meta(7, "ep", "snapshot", True, True, "would drop 90% of the map", "a:1", {"polls": 3})
    assert L.decode_meta(L.encode_meta(m)) == m


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_garbage_payloads_raise_only_corrupt_region(data: bytes) -> None:
    for decode in (L.decode_service, L.decode_meta, L.decode_txn):
        with contextlib.suppress(CorruptRegion):
            decode(data)
    with contextlib.suppress(CorruptRegion):
        L.decode_directory(data, 64)


@settings(max_examples=300)
@given(st.binary(min_size=64, max_size=64), st.integers(0, 1 << 20))
def test_garbage_headers_raise_only_corrupt_region(data: bytes, size: int) -> None:
    try:
        hdr = L.parse_header(data, size)
    except CorruptRegion:
        return
    assert hdr.file_size == size  # accepted only if self-consistent


def test_well_formed_msgpack_of_the_wrong_shape_is_corrupt() -> None:
    import msgpack

    bad = [
        ["svc", 1, "round_robin", 0.0, {}, [["h", "notaport", 1, "up", {}]]],
        ["svc", 1, "no-such-strategy", 0.0, {}, []],
        ["svc", 1, "random", 2.0, {}, []],
        ["svc", 1, "random", 0.0, {}, [["h", 1, 1, "sideways", {}]]],
        {"name": "svc"},
    ]
    for value in bad:
        with pytest.raises(CorruptRegion):
            L.decode_service(msgpack.packb(value))


def _region_with_table(index: list[int], nodes: int, version: int = 7) -> tuple[bytes, int]:
    service = L.encode_record(L.KIND_SERVICE, version, L.encode_service(Service("s", ())))
    table = L.encode_record(L.KIND_TABLE, version, L.encode_table(index, nodes, 0xABC))
    return b"\0" * 64 + L.with_table(service, table), 64


@pytest.mark.parametrize(("nodes", "width"), [(3, 1), (256, 1), (257, 2), (1000, 2)])
def test_table_record_round_trip(nodes: int, width: int) -> None:
    index = [i % nodes for i in range(101)]
    buf, off = _region_with_table(index, nodes)
    payload = L.table_payload(memoryview(buf), off, 7, len(buf))
    assert payload is not None
    entries, got_width, got_nodes, digest = L.decode_table(payload)
    assert (got_width, got_nodes, digest) == (width, nodes, 0xABC)
    assert list(entries.cast("B" if width == 1 else "H")) == index


def test_table_of_another_version_or_kind_is_absent() -> None:
    buf, off = _region_with_table([0, 1, 2], 3)
    assert L.table_payload(buf, off, 8, len(buf)) is None  # another publish's
    assert L.table_payload(buf, off + 64, 7, len(buf)) is None  # not a service record there
    assert L.table_payload(buf, off, 7, len(buf) - 1) is None  # runs past the end
    plain = b"\0" * 64 + L.encode_record(L.KIND_SERVICE, 7, L.encode_service(Service("s", ())))
    assert L.table_payload(plain + bytes(200), 64, 7, len(plain) + 200) is None


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_garbage_after_a_service_record_is_never_a_table(garbage: bytes) -> None:
    service = L.encode_record(L.KIND_SERVICE, 7, L.encode_service(Service("s", ())))
    buf = L.with_table(service, garbage)
    payload = L.table_payload(buf, 0, 7, len(buf))
    if payload is not None:  # only a record whose checksum verifies gets this far
        with contextlib.suppress(CorruptRegion):
            L.decode_table(payload)


def test_malformed_table_payloads_are_corrupt() -> None:
    good = L.encode_table([0, 1], 2, 1)
    for bad in (good[:10], b"XXXX" + good[4:], good + b"\0", L.encode_table([0], 0, 1)):
        with pytest.raises(CorruptRegion):
            L.decode_table(bad)
