"""Outlier detection policy (pure): Envoy's semantics, on a clock the test controls."""

from __future__ import annotations

from clustermap.sidecar.outlier import Observation, OutlierPolicy, Outliers

SERVICE = {"api": list(range(10))}


def fail(n: int) -> Observation:
    return Observation(ok=0, failed=n, tail=n)


def test_consecutive_failures_across_sweeps_eject_and_a_success_resets() -> None:
    o = Outliers(OutlierPolicy())
    assert o.step(0.0, {1: fail(3)}, SERVICE) == (set(), [])
    # A success after one more failure, in one sweep: only failures after it count (0 here).
    o.step(0.1, {1: Observation(ok=1, failed=1, tail=0)}, SERVICE)
    assert o.streak(1) == 0
    o.step(0.2, {1: fail(4)}, SERVICE)
    changed, new = o.step(0.3, {1: fail(1)}, SERVICE)
    assert changed == {"api"}
    assert [(s, i) for s, i, _ in new] == [("api", 1)]
    assert new[0][2].until == 0.3 + 30.0
    assert "5 consecutive failures" in new[0][2].reason


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    o = Outliers(OutlierPolicy(base_ejection_time=30, max_ejection_time=70, interval=1000))
    spans = []
    now = 0.0
    for _ in range(3):
        _, new = o.step(now, {1: fail(5)}, SERVICE)
        spans.append(new[0][2].until - now)
        now = new[0][2].until
        assert o.step(now, {}, SERVICE)[0] == {"api"}  # returns on its own
        assert o.ejected(1) is None
    assert spans == [30, 60, 70]


def test_the_multiplier_decays_while_the_node_stays_healthy() -> None:
    o = Outliers(OutlierPolicy(base_ejection_time=30, interval=10))
    _, new = o.step(0.0, {1: fail(5)}, SERVICE)
    o.step(30.0, {}, SERVICE)  # back
    o.step(60.0, {1: Observation(ok=1)}, SERVICE)  # 3 intervals in service: multiplier 0
    _, new = o.step(61.0, {1: fail(5)}, SERVICE)
    assert new[0][2].until - 61.0 == 30


def test_at_most_the_max_share_is_ejected_but_always_one() -> None:
    o = Outliers(OutlierPolicy(max_ejection_percent=10))
    _, new = o.step(0.0, {1: fail(5), 2: fail(5)}, {"small": [1, 2]})
    assert len(new) == 1  # 10 % of 2 nodes is 0: one may still go
    o2 = Outliers(OutlierPolicy(max_ejection_percent=20))
    ids = list(range(10))
    _, new = o2.step(0.0, {i: fail(5) for i in ids}, {"big": ids})
    assert len(new) == 2


def test_failures_of_calls_in_flight_when_ejected_do_not_extend_it() -> None:
    o = Outliers(OutlierPolicy(base_ejection_time=1))
    o.step(0.0, {1: fail(5)}, SERVICE)
    o.step(0.5, {1: fail(50)}, SERVICE)
    changed, _ = o.step(1.0, {}, SERVICE)
    assert changed == {"api"}
    assert o.ejected(1) is None
    assert o.streak(1) == 0


def test_failure_percentage_when_enabled() -> None:
    policy = OutlierPolicy(
        consecutive_failures=0, failure_percentage=50, minimum_hosts=3, request_volume=10
    )
    o = Outliers(policy)
    seen = {i: Observation(ok=20) for i in range(3)}
    seen[0] = Observation(ok=5, failed=15, tail=0)
    _, new = o.step(100.0, seen, {"api": [0, 1, 2]})
    assert [i for _, i, _ in new] == [0]
    assert "75% of calls failed" in new[0][2].reason
    # Too few busy nodes: no verdict.
    o = Outliers(policy)
    _, new = o.step(100.0, {0: Observation(ok=0, failed=20, tail=0)}, {"api": [0, 1, 2]})
    assert new == []
