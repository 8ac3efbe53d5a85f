"""The map checksum: pinned vectors, order independence, incremental updates, sensitivity."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType

import msgpack
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from clustermap.checksum import MASK, map_checksum, pack_node, service_digest, update_checksum
from clustermap.model import Node, Service

BASE = Service(
    name="user-svc",
    nodes=(
        Node("10.0.0.2", 80, 2, "up", MappingProxyType({"zone": "b", "az": "1"})),
        Node("10.0.0.1", 80, 1, "drain"),
    ),
    strategy="weighted",
    panic_threshold=0.5,
    meta=MappingProxyType({"team": "id"}),
)


def test_pinned_vectors() -> None:
    """Changing these means every sidecar and server must change together (bump FORMAT_TAG)."""
    assert service_digest(Service("a")) == 0xF60844A4F8CDDD85
    assert service_digest(Service("a", (Node("h", 1),))) == 0xC7CCE949413B6ACF
    assert service_digest(BASE) == 0x1475E304D0551524


def test_canonical_encoding_is_as_documented() -> None:
    doc = ["cm1", "a", [["h", 1, 1, "up", []]], "round_robin", 0.0, []]
    encoded = msgpack.packb(doc, use_bin_type=True)
    assert encoded.hex() == (
        "96a3636d31a1619195a1680101a2757090ab726f756e645f726f62696ecb000000000000000090"
    )
    assert service_digest(Service("a", (Node("h", 1),))) == xxhash.xxh3_64_intdigest(encoded)


def _whole_document_digest(service: Service) -> int:
    """The digest as documented: the whole document packed at once."""

    def pairs(meta: Mapping[str, str]) -> list[list[str]]:
        return [[k, meta[k]] for k in sorted(meta)]

    nodes = sorted(service.nodes, key=lambda n: (n.host, n.port))
    doc = [
        "cm1",
        service.name,
        [[n.host, n.port, n.weight, n.status, pairs(n.meta)] for n in nodes],
        service.strategy,
        float(service.panic_threshold),
        pairs(service.meta),
    ]
    return xxhash.xxh3_64_intdigest(msgpack.packb(doc, use_bin_type=True))


def test_digest_assembled_from_packed_nodes_is_the_whole_documents() -> None:
    """The server's digest from nodes packed once each (:func:`pack_node`) equals packing the
    whole document, across msgpack's array size classes (fixarray, array16, array32)."""
    for count in (0, 1, 15, 16, 17, 300, 65_535, 65_536):
        nodes = tuple(
            Node(f"10.{i // 65_536}.{i // 256 % 256}.{i % 256}", 80 + i % 3, 1 + i % 5, "up",
                 MappingProxyType({"zone": "ab"[i % 2]} if i % 7 else {}))
            for i in range(count)
        )  # fmt: skip
        service = replace(BASE, nodes=nodes)
        packed = [pack_node(n) for n in sorted(nodes, key=lambda n: (n.host, n.port))]
        expected = _whole_document_digest(service)
        assert service_digest(service) == expected
        assert service_digest(service, packed) == expected


def test_node_and_meta_order_do_not_matter_revision_does_not_count() -> None:
    shuffled = replace(
        BASE,
        nodes=tuple(reversed(BASE.nodes)),
        meta=MappingProxyType({"team": "id"}),
        revision=99,
    )
    node = BASE.nodes[0]
    reordered_meta = node._replace(meta=MappingProxyType({"az": "1", "zone": "b"}))
    shuffled = replace(shuffled, nodes=(BASE.nodes[1], reordered_meta))
    assert service_digest(shuffled) == service_digest(BASE)


def test_every_observable_field_changes_the_digest() -> None:
    n0, n1 = BASE.nodes
    variants = [
        replace(BASE, name="other"),
        replace(BASE, strategy="random"),
        replace(BASE, panic_threshold=0.25),
        replace(BASE, meta=MappingProxyType({"team": "x"})),
        replace(BASE, nodes=(n0,)),
        replace(BASE, nodes=(n0._replace(host="10.0.0.3"), n1)),
        replace(BASE, nodes=(n0._replace(port=81), n1)),
        replace(BASE, nodes=(n0._replace(weight=3), n1)),
        replace(BASE, nodes=(n0._replace(status="down"), n1)),
        replace(BASE, nodes=(n0._replace(meta=MappingProxyType({"zone": "c"})), n1)),
    ]
    digests = {service_digest(v) for v in variants}
    assert len(digests) == len(variants)
    assert service_digest(BASE) not in digests


def test_empty_map_is_zero_and_sum_wraps() -> None:
    assert map_checksum([]) == 0
    assert map_checksum([MASK, 2]) == 1


_names = st.text(alphabet="abcdef", min_size=1, max_size=4)
_services = st.dictionaries(
    _names,
    st.lists(st.tuples(st.sampled_from(["h1", "h2"]), st.integers(1, 3)), unique=True),
    max_size=6,
)


@given(_services, _services)
def test_incremental_update_equals_recomputation(before: dict, after: dict) -> None:
    def svc(name: str, addrs: list) -> Service:
        return Service(name, tuple(Node(h, p) for h, p in addrs))

    digests_before = {n: service_digest(svc(n, a)) for n, a in before.items()}
    digests_after = {n: service_digest(svc(n, a)) for n, a in after.items()}
    checksum = map_checksum(digests_before.values())
    for name in before.keys() | after.keys():
        checksum = update_checksum(checksum, digests_before.get(name), digests_after.get(name))
    assert checksum == map_checksum(digests_after.values())
