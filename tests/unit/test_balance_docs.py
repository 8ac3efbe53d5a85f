"""The test vectors published in docs/hashing.md are parsed from the doc and checked here."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import xxhash

from clustermap.balance import MAGLEV_TABLE_SIZE, ServicePicker, build_maglev, canonical_name
from clustermap.balance.hashing import ketama_hash
from clustermap.model import Node, Service

DOC = Path(__file__).resolve().parents[2] / "docs" / "hashing.md"
_BLOCK = re.compile(r"<!-- vectors:(\S+) -->\n(.*?)\n<!-- /vectors -->", re.S)


def blocks() -> dict[str, list[list[str]]]:
    """Each vectors block as its table rows (header and separator dropped), cells stripped."""
    found: dict[str, list[list[str]]] = {}
    for name, body in _BLOCK.findall(DOC.read_text(encoding="utf-8")):
        lines = [line for line in body.splitlines() if line.startswith("|")]
        found[name] = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]
    return found


VECTORS = blocks()


def node_of(name: str, weight: int) -> Node:
    host, _, port = name.rpartition(":")
    return Node(host.strip("[]"), int(port), weight=weight)


def test_doc_has_every_block() -> None:
    assert set(VECTORS) == {
        "xxh64",
        "maglev-a",
        "maglev-a-table",
        "maglev-b",
        "maglev-b-table",
        "maglev-keys",
        "ketama-nodes",
        "ketama-keys",
    }
    assert len(VECTORS["maglev-keys"]) >= 12
    assert len(VECTORS["ketama-keys"]) >= 12


def test_xxh64_vectors() -> None:
    rows = VECTORS["xxh64"]
    assert ['""', "0", "0xef46db3751d8e999"] in rows
    for text, seed, value in rows:
        assert xxhash.xxh64_intdigest(json.loads(text).encode(), int(seed)) == int(value, 16)


@pytest.mark.parametrize("name", ["maglev-a", "maglev-b"])
def test_maglev_node_and_table_vectors(name: str) -> None:
    rows = VECTORS[name]
    names = [r[0] for r in rows]
    nodes = [node_of(r[0], int(r[1])) for r in rows]
    picker = ServicePicker(Service("doc", tuple(reversed(nodes))))
    assert [canonical_name(n) for n in picker.nodes] == names  # the doc lists canonical order
    m = MAGLEV_TABLE_SIZE
    for node_name, _, offset, skip in rows:
        raw = node_name.encode()
        assert xxhash.xxh64_intdigest(raw) % m == int(offset)
        assert xxhash.xxh64_intdigest(raw, 1) % (m - 1) + 1 == int(skip)
    table = build_maglev(names, [int(r[1]) for r in rows])
    props = dict(VECTORS[f"{name}-table"])
    counts = Counter(table)
    assert props["slots per node (canonical order)"].split() == [
        str(counts[i]) for i in range(len(names))
    ]
    assert props["table[0..15]"].split() == [str(i) for i in table[:16]]
    digest = hashlib.sha256(b"".join(i.to_bytes(4, "little") for i in table)).hexdigest()
    assert props["sha256(table as u32 little-endian)"] == digest


def test_maglev_key_vectors() -> None:
    pickers = [
        ServicePicker(Service("doc", tuple(node_of(r[0], int(r[1])) for r in VECTORS[s])))
        for s in ("maglev-a", "maglev-b")
    ]
    for key_json, slot, node_a, node_b in VECTORS["maglev-keys"]:
        key = json.loads(key_json)
        assert xxhash.xxh64_intdigest(key.encode()) % MAGLEV_TABLE_SIZE == int(slot)
        assert pickers[0].pick(key=key).address == node_a
        assert pickers[1].pick(key=key).address == node_b


def test_ketama_key_vectors() -> None:
    nodes = tuple(node_of(name, int(weight)) for name, weight in VECTORS["ketama-nodes"])
    ketama = ServicePicker(Service("doc", nodes, meta={"hash": "ketama"}))
    libmemcached = ServicePicker(Service("doc", nodes, meta={"hash": "ketama_libmemcached"}))
    for key_json, point, node_k, node_l in VECTORS["ketama-keys"]:
        key = json.loads(key_json)
        assert ketama_hash(key) == int(point)
        assert ketama.pick(key=key).address == node_k
        assert libmemcached.pick(key=key).address == node_l
