"""Per-server backoff: exponential, capped, jittered, and the first server tried again first."""

from __future__ import annotations

from clustermap.sidecar.retry import Backoff


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_failover_order_and_return_to_the_first() -> None:
    clock = Clock()
    b = Backoff(["a", "b"], base=1, cap=8, clock=clock, rand=lambda: 1.0)
    assert b.order() == ["a", "b"]
    assert b.failed("a") == 1.0
    assert b.order() == ["b"]  # a backs off
    clock.now = 1.0
    assert b.order() == ["a", "b"]  # a's backoff is over: it is tried first again
    b.succeeded("a")
    assert b.failures("a") == 0


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    b = Backoff(["a"], base=0.5, cap=4, clock=lambda: 0.0, rand=lambda: 1.0)
    assert [b.failed("a") for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    low = Backoff(["a"], base=0.5, cap=4, clock=lambda: 0.0, rand=lambda: 0.0)
    assert low.failed("a") == 0.25  # full jitter keeps at least half the delay


def test_when_all_back_off_the_soonest_is_tried() -> None:
    b = Backoff(["a", "b"], base=1, cap=8, clock=lambda: 0.0, rand=lambda: 1.0)
    b.failed("a")
    b.failed("a")
    b.failed("b")
    assert b.order() == ["b"]
