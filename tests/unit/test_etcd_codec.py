"""The etcd record format (pure): keys and node records round-trip, old records still decode,
malformed ones are refused with a reason."""

from __future__ import annotations

import pytest

from clustermap.server.etcd_codec import Keys, decode_record, encode_record, prefix_end
from clustermap.server.store import STATIC, NodeRecord


def test_node_keys_round_trip_and_other_keys_are_not_nodes() -> None:
    keys = Keys("/cm")
    assert keys.prefix == "/cm/"
    for key in (("user-svc", "10.0.0.1", 80), ("a", "::1", 1), ("a.b", "host.example", 65535)):
        raw = keys.node(key)
        assert raw.startswith(b"/cm/n/")
        assert keys.parse_node(raw) == key
    assert keys.parse_node(keys.sync) is None
    assert keys.parse_node(keys.leader + b"abc") is None
    assert keys.parse_node(b"/cm/o/user-svc") is None  # options keys of older versions
    for bad in (b"/cm/n/a/h/x", b"/cm/n/a/h", b"/cm/n//h/1"):
        with pytest.raises(ValueError, match=r"malformed|invalid literal|not enough values"):
            keys.parse_node(bad)


def test_prefix_end_covers_the_prefix() -> None:
    assert prefix_end(b"/cm/") == b"/cm0"


def test_records_round_trip() -> None:
    for rec in (
        NodeRecord(),
        NodeRecord(weight=0, status="down", meta={"zone": "a"}, origin=STATIC, probed=False),
        NodeRecord(admin_weight=5, admin_status="drain"),
    ):
        assert decode_record(encode_record(rec)) == rec


def test_the_format_is_pinned() -> None:
    assert encode_record(NodeRecord(weight=2, meta={"z": "1"})) == (
        b'{"m":{"z":"1"},"o":"registered","s":"up","w":2}'
    )
    assert encode_record(NodeRecord(origin=STATIC, probed=False, admin_status="drain")) == (
        b'{"as":"drain","m":{},"o":"static","p":false,"s":"up","w":1}'
    )


def test_records_of_older_versions_decode() -> None:
    old = b'{"w": 3, "s": "up", "m": {"k": "v"}, "o": "registered", "aw": null, "as": null}'
    assert decode_record(old) == NodeRecord(weight=3, meta={"k": "v"})
    assert decode_record(b"{}") == NodeRecord()


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b"not json",
        b'{"w": -1}',
        b'{"w": true}',
        b'{"w": "2"}',
        b'{"s": "sideways"}',
        b'{"o": "other"}',
        b'{"m": {"k": 1}}',
        b'{"m": []}',
        b'{"as": "gone"}',
    ],
)
def test_malformed_records_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):  # a reason, whatever the fault
        decode_record(raw)
