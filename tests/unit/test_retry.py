"""The one retry module: jitter bounds, the retry loop's stopping rules, the failover backoff."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest

from clustermap.retry import Backoff, Retry, equal_jitter, full_jitter


def test_full_jitter_spans_zero_to_the_capped_delay() -> None:
    rng = random.Random(1)
    for n, ceiling in ((1, 0.5), (3, 2.0), (10, 4.0)):
        draws = [full_jitter(n, 0.5, 4.0, rng.random) for _ in range(2000)]
        assert 0.0 <= min(draws) < 0.05 * ceiling
        assert 0.95 * ceiling < max(draws) <= ceiling


def test_equal_jitter_keeps_half_the_delay_as_a_floor() -> None:
    rng = random.Random(2)
    for n, ceiling in ((1, 0.5), (3, 2.0), (10, 4.0)):
        draws = [equal_jitter(n, 0.5, 4.0, rng.random) for _ in range(2000)]
        assert ceiling / 2 <= min(draws) < 0.55 * ceiling
        assert 0.95 * ceiling < max(draws) <= ceiling


def test_backoff_with_real_randomness_stays_within_equal_jitter() -> None:
    b = Backoff(["a"], base=1.0, cap=8.0, clock=lambda: 0.0)
    for n in range(1, 7):
        ceiling = min(8.0, 2.0 ** (n - 1))
        assert ceiling / 2 <= b.failed("a") <= ceiling


class Down(Exception):
    pass


class Fake:
    """A clock that sleeping advances, and a record of the sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _failing(
    fake: Fake, failures: int, cost: float = 0.0
) -> tuple[list[float], Callable[[float], str]]:
    seen: list[float] = []

    def fn(remaining: float) -> str:
        seen.append(remaining)
        fake.now += cost
        if len(seen) <= failures:
            raise Down("down")
        return "ok"

    return seen, fn


def test_retry_backs_off_exponentially_up_to_max_delay() -> None:
    fake = Fake()
    retry = Retry(delay=0.1, backoff=2.0, max_delay=0.5, sleep=fake.sleep, clock=fake.clock)
    _, fn = _failing(fake, 5)
    assert retry(fn, lambda e: True) == "ok"
    assert fake.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_retry_stops_at_max_tries_and_on_a_non_retryable_error() -> None:
    fake = Fake()
    retry = Retry(max_tries=3, sleep=fake.sleep, clock=fake.clock)
    seen, fn = _failing(fake, 10)
    with pytest.raises(Down, match="down"):
        retry(fn, lambda e: True)
    assert len(seen) == 3
    seen, fn = _failing(fake, 10)
    with pytest.raises(Down, match="down"):
        retry(fn, lambda e: not isinstance(e, Down))
    assert len(seen) == 1


def test_retry_never_sleeps_past_its_deadline_and_tells_each_attempt_the_time_left() -> None:
    fake = Fake()
    retry = Retry(delay=0.05, max_delay=0.5, sleep=fake.sleep, clock=fake.clock).within(1.0)
    seen, fn = _failing(fake, 100, cost=0.1)
    with pytest.raises(Down, match="down"):
        retry(fn, lambda e: True)
    assert seen[0] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(seen))
    assert fake.now <= 1.0 + 0.1  # the last attempt may run to the deadline, no sleep beyond


def test_retry_jitter_only_shortens_a_delay() -> None:
    fake = Fake()
    retry = Retry(delay=1.0, max_delay=1.0, jitter=0.5, sleep=fake.sleep, clock=fake.clock)
    _, fn = _failing(fake, 200)
    assert retry(fn, lambda e: True) == "ok"
    assert all(0.5 <= s <= 1.0 for s in fake.sleeps)
    assert max(fake.sleeps) - min(fake.sleeps) > 0.25
