"""Outlier detection policy (pure): Envoy's semantics, on a clock the test controls."""

from __future__ import annotations

import math
from dataclasses import replace

from clustermap.sidecar.outlier import (
    Observation,
    OutlierPolicy,
    Outliers,
    SuccessRateVerdict,
    success_rate_outliers,
)

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


def test_success_rate_threshold_is_envoys_mean_minus_factor_stdev() -> None:
    # Envoy's own vector (test/common/upstream/outlier_detection_impl_test.cc, SRThreshold):
    # rates 50, 100 x 4 -> mean 90, population stdev 20, threshold 90 - 1.9 x 20 = 52.
    counts = {0: (50, 50), 1: (100, 0), 2: (100, 0), 3: (100, 0), 4: (100, 0)}
    verdict = success_rate_outliers(counts, 1.9, 5, 100)
    assert verdict is not None
    assert (verdict.mean, verdict.threshold, verdict.outliers) == (90.0, 52.0, (0,))
    # Fewer than minimum_hosts nodes with request_volume calls: no verdict at all.
    assert success_rate_outliers({**counts, 4: (99, 0)}, 1.9, 5, 100) is None
    assert success_rate_outliers(counts, 1.9, 6, 100) is None
    # Equal rates: the stdev is 0 and nobody is below the mean.
    equal = dict.fromkeys(range(5), (95, 5))
    assert success_rate_outliers(equal, 1.9, 5, 100) == SuccessRateVerdict(95.0, 95.0, ())
    # A wider spread raises the bar for calling anyone an outlier (stdev grows with it).
    spread = {0: (60, 40), 1: (70, 30), 2: (80, 20), 3: (90, 10), 4: (100, 0)}
    assert success_rate_outliers(spread, 1.9, 5, 100) == SuccessRateVerdict(
        80.0, 80.0 - 1.9 * math.sqrt(200), ()
    )


def calls(ok: int, failed: int) -> Observation:
    return Observation(ok=ok, failed=failed, tail=0)


def test_success_rate_ejects_once_per_interval_from_the_intervals_counts() -> None:
    o = Outliers(OutlierPolicy(interval=10, max_ejection_percent=50))
    o.step(0.0, {}, SERVICE)  # the first interval starts
    # Spread over sweeps: node 3 fails 30 % of 200 calls, never 5 in a row; 9 others are fine.
    # Rates 70 and 100 x 9: mean 97, stdev 9, threshold 97 - 1.9 x 9 = 79.9.
    for k in range(1, 10):
        seen = {i: calls(20, 0) for i in range(10)}
        seen[3] = calls(14, 6)
        assert o.step(float(k), seen, SERVICE) == (set(), [])  # not before the interval ends
    changed, new = o.step(10.0, {i: calls(20, 0) for i in range(10)} | {3: calls(14, 6)}, SERVICE)
    assert changed == {"api"}
    assert [(i, e.kind) for _, i, e in new] == [(3, "success_rate")]
    assert new[0][2].reason == "success rate 70% below 80% (mean 97%) over 10 s"
    # The next interval starts from zero: one bad sweep is not 100 calls.
    assert o.step(20.0, {7: calls(0, 4)}, SERVICE) == (set(), [])


def test_success_rate_needs_volume_and_hosts_and_can_be_partly_enforced() -> None:
    def interval(policy: OutlierPolicy, draw: float, volume: int = 20) -> list[int]:
        o = Outliers(policy, draw=lambda: draw)
        o.step(0.0, {}, SERVICE)
        seen = {i: calls(volume, 0) for i in range(10)} | {3: calls(volume // 2, volume // 2)}
        for k in range(1, 6):
            o.step(float(k), seen, SERVICE)
        return [i for _, i, _ in o.step(10.0, {}, SERVICE)[1]]

    policy = OutlierPolicy(interval=10, consecutive_failures=0)
    assert interval(policy, 0.0) == [3]
    assert interval(policy, 0.0, volume=19) == []  # 95 calls < success_rate_request_volume
    assert interval(replace(policy, success_rate_minimum_hosts=11), 0.0) == []
    assert interval(replace(policy, success_rate_enforcing=0), 0.0) == []  # off
    assert interval(replace(policy, success_rate_enforcing=30), 0.29) == [3]
    assert interval(replace(policy, success_rate_enforcing=30), 0.30) == []
