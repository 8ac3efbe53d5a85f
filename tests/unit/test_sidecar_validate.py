"""What the sidecar refuses from a server: anything the registry could never have accepted."""

from __future__ import annotations

import pytest

from clustermap.model import Node, Service
from clustermap.sidecar.validate import InvalidAnswer, check_services, invalid_services, shown_name


def test_valid_services_pass() -> None:
    check_services(
        [
            Service(
                "user-svc",
                (
                    Node("10.0.0.1", 80, meta={"zone": "a"}),
                    Node("::1", 81),
                    Node("db-1.example.com", 5432),
                ),
            ),
            Service("x.y_z-1", (), strategy="weighted", panic_threshold=0.5, meta={"team": "t"}),
        ]
    )


@pytest.mark.parametrize(
    ("service", "message"),
    [
        (Service("", ()), "name"),
        (Service("bad name", ()), "name"),
        (Service("a" * 129, ()), "name"),
        (Service("a", (), panic_threshold=float("nan")), "panic_threshold"),
        (Service("a", (Node("evil host", 1),)), "host 'evil host'"),
        (Service("a", (Node("-x", 1),)), "host '-x'"),
        (Service("a", (Node("h" * 300, 1),)), "host longer than 253"),
        (Service("a", (Node("h", 1, meta={"k": "v" * 600}),)), "meta value of 'k'"),
        (Service("a", (Node("h", 1, meta={f"k{i}": "v" for i in range(40)}),)), "meta"),
        (Service("a", (), meta={"bad key!": "v"}), "meta"),
    ],
)
def test_invalid_services_are_refused_with_the_reason(service: Service, message: str) -> None:
    with pytest.raises(InvalidAnswer, match=message):
        check_services([Service("ok", ()), service])


def test_each_invalid_service_is_named_and_the_valid_ones_are_not() -> None:
    services = [
        Service("ok", (Node("10.0.0.1", 80),)),
        Service("a", (Node("evil host", 1),)),
        Service("b", (Node("h", 1, meta={"k": "v" * 600}),)),
        Service("also-ok", (Node("::1", 81),)),
    ]
    bad = invalid_services(services)
    assert set(bad) == {"a", "b"}
    assert "host 'evil host'" in bad["a"]
    assert "meta value of 'k'" in bad["b"]
    assert invalid_services(services[:1] + services[3:]) == {}


def test_names_shown_to_operators_are_escaped_when_invalid() -> None:
    assert shown_name("user-svc") == "user-svc"
    assert shown_name("a\x1b[2Jb") == "'a\\x1b[2Jb'"
    assert shown_name("\u202eevil") == "'\\u202eevil'"
