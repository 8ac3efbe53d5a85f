"""The server and every sidecar apply one rule: what cm-server registers, sidecars accept.

The same hostile corpus goes through the server's edge validation (``Registration``) and the
sidecar's answer check (``check_services``). A record the server accepts must reach sidecars
unchanged-and-accepted (else one registration freezes that service on every machine); a record
the server refuses, the sidecar refuses too (a hostile server gains nothing either).
"""

from __future__ import annotations

import pytest

from clustermap import rules
from clustermap.model import Node, Service
from clustermap.server.validation import Registration, ValidationError
from clustermap.sidecar.validate import InvalidAnswer, check_services

HOSTS = [
    "10.0.0.1",
    "255.255.255.255",
    "256.1.1.1",
    "01.2.3.4",
    "1.2.3",
    "db-1.example.com",
    "DB-1.Example.COM",
    "example.com.",
    "-x.example",
    "x-.example",
    "a..b",
    "a" * 63 + ".b",
    "a" * 64 + ".b",
    ".".join(["a" * 63] * 4),
    "under_score.example",
    "::1",
    "::0001",
    "FE80::1",
    "fe80::1%eth0",
    "fe80::1%x_y",
    "fe80::1%x.y-1",
    "fe80::1%",
    "fe80::1%x\x1by",
    "fe80::1%x y",
    "fe80::1%a/b",
    "fe80::1%" + "a" * 15,
    "fe80::1%" + "a" * 16,
    "fe80::1%1%2",
    "10.0.0.1%eth0",
    "10.0.0.1%",
    "1::2::3",
    ":::",
    "[::1]",
    "evil host",
    "host\nother",
    "x\x00",
    "\u202ehost",
    "ex\u00e4mple.com",
    "",
    "h" * 300,
]

METAS: list[dict[str, str]] = [
    {},
    {"zone": "a"},
    {"zone": "a\x1b[2J"},
    {"k": "line\nbreak"},
    {"k": "nul\x00"},
    {"k": "tab\there"},
    {"k": "del\x7f"},
    {"k": "c1\x9b"},
    {"k": "bidi\u202e"},
    {"k": "isolate\u2066"},
    {"k": "sep\u2028"},
    {"k": "héllo wörld ✓"},
    {"k": "v" * 512},
    {"k": "v" * 513},
    {"k" * 64: "v"},
    {"k" * 65: "v"},
    {"bad key": "v"},
    {"-k": "v"},
    {"a/b.c_d-e": "v"},
    {f"k{i}": "v" for i in range(32)},
    {f"k{i}": "v" for i in range(33)},
    {f"k{i}": "v" * 500 for i in range(9)},
]

NAMES = ["user-svc", "a.b_c-1", "", "-x", "bad name", "x" * 128, "x" * 129, "é", "a\x1b"]


def _server(name: str, host: str, meta: dict[str, str]) -> Registration | None:
    try:
        return Registration(service=name, host=host, port=80, meta=meta)
    except ValidationError:
        return None


def _sidecar(name: str, host: str, meta: dict[str, str]) -> bool:
    try:
        check_services([Service(name, (Node(host, 80, meta=meta),))])
    except InvalidAnswer:
        return False
    return True


# Well-formed characters, malformed structure: the sidecar's bulk host check is a superset of
# canonical hosts for structure (see rules.LOOSE_HOST_PATTERN), exact for characters.
STRUCTURE_ONLY = {
    "256.1.1.1",
    "01.2.3.4",
    "1.2.3",
    "example.com.",
    "x-.example",
    "a..b",
    "a" * 64 + ".b",
    "::0001",
    "1::2::3",
    ":::",
}


@pytest.mark.parametrize("host", HOSTS)
def test_hosts(host: str) -> None:
    reg = _server("svc", host, {})
    if reg is not None:
        assert _sidecar("svc", reg.host, {}), f"server registered {reg.host!r}, sidecars refuse it"
    expected = (reg is not None and reg.host == host) or host in STRUCTURE_ONLY
    assert _sidecar("svc", host, {}) == expected


@pytest.mark.parametrize("meta", METAS, ids=range(len(METAS)))
def test_meta(meta: dict[str, str]) -> None:
    reg = _server("svc", "10.0.0.1", meta)
    assert _sidecar("svc", "10.0.0.1", meta) == (reg is not None)
    if reg is not None:
        assert _sidecar("svc", "10.0.0.1", dict(reg.meta))


@pytest.mark.parametrize("name", NAMES)
def test_names(name: str) -> None:
    assert _sidecar(name, "10.0.0.1", {}) == (_server(name, "10.0.0.1", {}) is not None)


def test_zone_ids_are_restricted_and_errors_are_clipped() -> None:
    assert rules.check_host("FE80::1%eth0") == "fe80::1%eth0"
    with pytest.raises(ValueError, match="zone id") as exc:
        rules.check_host("fe80::1%x\x1by")
    assert "\x1b" not in str(exc.value)
    with pytest.raises(ValueError, match="service name") as exc:
        rules.check_service_name("-" * 100_000)
    assert len(str(exc.value)) < 300


@pytest.mark.parametrize("ttl", [-0.0, float("nan"), float("inf"), -1.0, 0.05, 3601.0])
def test_bad_ttls(ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        rules.check_ttl(ttl)


def test_good_ttls() -> None:
    assert rules.check_ttl(None) is None
    assert rules.check_ttl(0.0) == 0.0
    assert rules.check_ttl(0.1) == 0.1
