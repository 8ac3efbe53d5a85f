"""What the sidecar refuses from a server: anything the registry could never have accepted."""

from __future__ import annotations

import pytest

from clustermap.model import Node, Service
from clustermap.sidecar.validate import InvalidAnswer, check_services


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
