"""The HTTP glue's pure rules: retries, backoff, the budget, URL rewriting, the error's class."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clustermap.feedback.budget import BudgetRule
from clustermap.feedback.retries import RequestFailed, with_tried
from clustermap.http._policy import Failure, Policy, node_netloc, rewrite, target_of
from clustermap.model import Node


def node(host: str, port: int) -> Node:
    return Node(host, port, 1, "up", {})


def test_connect_failures_are_retried_for_any_method_other_failures_only_if_idempotent() -> None:
    p = Policy()
    assert p.may_retry(Failure.CONNECT, "POST", replayable=False, retries=0)
    assert not p.may_retry(Failure.STATUS, "POST", replayable=True, retries=0)
    assert p.may_retry(Failure.STATUS, "GET", replayable=True, retries=0)
    assert p.may_retry(Failure.RESET, "put", replayable=True, retries=1)
    assert not p.may_retry(Failure.RESET, "GET", replayable=False, retries=0)  # a stream body
    assert not p.may_retry(Failure.TIMEOUT, "GET", replayable=True, retries=0)  # off by default
    assert Policy(retry_on_timeout=True).may_retry(Failure.TIMEOUT, "GET", True, 0)
    assert not p.may_retry(Failure.CONNECT, "GET", replayable=True, retries=2)  # max_retries
    assert not Policy(max_retries=0).may_retry(Failure.CONNECT, "GET", True, 0)


def test_failure_statuses_are_configurable() -> None:
    assert Policy().is_failure(500)
    assert Policy().is_failure(503)
    assert not Policy().is_failure(404)
    p = Policy(failure_statuses=frozenset({503, 429}))
    assert p.is_failure(429)
    assert not p.is_failure(500)


@given(st.integers(1, 30), st.floats(0, 1, exclude_max=True))
def test_backoff_is_jittered_and_capped(retry: int, r: float) -> None:
    p = Policy()
    delay = p.backoff(retry, lambda: r)
    assert 0 <= delay <= p.backoff_max
    assert delay <= p.backoff_base * 2 ** (retry - 1) + 1e-12


def test_the_budget_rule_is_envoys() -> None:
    rule = BudgetRule()
    assert (rule.percent, rule.min_concurrency) == (20.0, 3)
    assert rule.limit(0) == 3
    assert rule.limit(10) == 3
    assert rule.limit(100) == 20
    assert rule.allows(100, 19)
    assert not rule.allows(100, 20)
    assert not BudgetRule(0.0, 0).allows(1000, 0)
    with pytest.raises(ValueError, match="percent"):
        BudgetRule(150.0)


def test_only_service_hosts_are_targets_and_rewrites_keep_the_rest_of_the_url() -> None:
    services = {"user-svc"}.__contains__
    assert target_of("http://example.com/x", services) is None
    assert target_of("http://127.0.0.1:80/", lambda h: True) is None  # an IP is never a service
    assert target_of("http://[::1]:80/", lambda h: True) is None
    t = target_of("https://u:p@User-Svc:8443/a?b=1", services)
    assert t is not None
    assert (t.service, t.host_header, t.tls_name) == ("user-svc", "User-Svc:8443", "user-svc")
    assert target_of("https://user-svc/", services, "api.internal").tls_name == "api.internal"  # type: ignore[union-attr]
    assert rewrite("https://u:p@user-svc:8443/a?b=1#f", node("10.0.0.5", 9000)) == (
        "https://u:p@10.0.0.5:9000/a?b=1#f"
    )
    assert rewrite("http://user-svc/", node("fd00::5", 80)) == "http://[fd00::5]:80/"
    assert node_netloc(node("h", 1)) == "h:1"


def test_the_last_error_keeps_its_class_and_gains_tried() -> None:
    class LibError(OSError):
        pass

    exc = with_tried(LibError("refused"), "svc", ["a:1", "b:2"])
    assert isinstance(exc, LibError)
    assert isinstance(exc, RequestFailed)
    assert exc.tried == ("a:1", "b:2")
    assert exc.service == "svc"
    assert type(exc).__name__ == "LibError"
    again = with_tried(LibError("x"), "svc", [])
    assert type(again) is type(exc)  # one mixed class per library class


def test_the_httpx_node_url_is_what_copy_with_gives() -> None:
    import httpx

    from clustermap.http._httpx import _FAST_URL, _node_url

    assert _FAST_URL  # the pinned httpx: the fast path is on (and checked against copy_with)
    for url in ("http://svc/", "https://u@svc:8443/a%20b?q=1&r=%2F#x", "http://svc/?a=é"):
        for host in ("10.1.2.3", "fd00::1", "Node-A.example"):
            u = httpx.URL(url)
            assert _node_url(u, node(host, 8080)) == u.copy_with(host=host, port=8080)
