"""Retrying: the one home of backoff delays, the retry loop and per-server failover backoff.

Pure (clock, sleep and random source injectable), stdlib only, cheap enough for a worker-side
import. Three shapes, one rule for the delays (``base * 2**(n-1)`` capped at ``cap``):

- :func:`full_jitter` draws uniformly in ``[0, min(cap, base * 2**(n-1))]``, AWS's "Exponential
  Backoff and Jitter": the least total work when many clients retry one call at once (the
  workers' retries to another node, :mod:`clustermap.feedback.retries`).
- :func:`equal_jitter` draws in ``[d/2, d]``: half the delay is a floor. :class:`Backoff` uses it
  because a failed server must really be skipped for a while: with full jitter a dead primary
  could come back to the front of the order after ~0 s and be dialled on every round.
- :class:`Retry` is kazoo's ``KazooRetry``: call until success, a non-retryable error, ``max_tries``
  or the ``deadline``, sleeping ``delay`` (times ``backoff`` after each failure, at most
  ``max_delay``, optionally jittered) in between.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["Backoff", "Retry", "equal_jitter", "full_jitter"]

T = TypeVar("T")


def _ceiling(n: int, base: float, cap: float) -> float:
    return min(cap, base * 2.0 ** max(0, n - 1))


def full_jitter(
    n: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Delay before retry ``n`` (1-based): uniform in ``[0, min(cap, base * 2**(n-1))]``."""
    return rand() * _ceiling(n, base, cap)


def equal_jitter(
    n: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Delay after failure ``n`` (1-based): uniform in ``[d/2, d]``, d as in :func:`full_jitter`."""
    return _ceiling(n, base, cap) * (0.5 + 0.5 * rand())


@dataclass(frozen=True, slots=True)
class Retry:
    """A retry policy in the shape of kazoo's ``KazooRetry``; call it with the operation.

    ``fn`` receives the seconds left before the deadline (``math.inf`` without one) so that it can
    bound each attempt. An exception for which ``retry_on`` is false, the last of ``max_tries``
    attempts, or one after which the next sleep would not end before the deadline propagates
    unchanged. ``jitter`` is the largest fraction taken off a delay at random (0: none).
    """

    max_tries: int | None = None
    delay: float = 0.1
    backoff: float = 2.0
    max_delay: float = 1.0
    jitter: float = 0.0
    deadline: float | None = None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random

    def within(self, deadline: float | None) -> Retry:
        """The same policy with another deadline (seconds, counted from each call)."""
        return dataclasses.replace(self, deadline=deadline)

    def __call__(self, fn: Callable[[float], T], retry_on: Callable[[Exception], bool]) -> T:
        delay = self.delay
        end = math.inf if self.deadline is None else self.clock() + self.deadline
        tries = 0
        while True:
            tries += 1
            try:
                return fn(end - self.clock())
            except Exception as exc:
                if not retry_on(exc) or (self.max_tries is not None and tries >= self.max_tries):
                    raise
                pause = delay * (1.0 - self.jitter * self.rand())
                if end - self.clock() <= pause:
                    raise
            self.sleep(pause)
            delay = min(delay * self.backoff, self.max_delay)


@dataclass(slots=True)
class Backoff:
    """Failover order and per-server exponential backoff with equal jitter (see module doc).

    Each server has its own backoff: a failure makes it wait :func:`equal_jitter` of its failure
    count, so a fleet of sidecars that lost a server at the same instant does not return to it in
    lockstep (consul #5417). A round tries the servers in the configured order, skipping those
    still backing off, so the first server is used again as soon as its backoff has passed and it
    answers.
    """

    servers: list[str]
    base: float = 0.5
    cap: float = 30.0
    clock: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random
    _failures: dict[str, int] = field(default_factory=dict)
    _until: dict[str, float] = field(default_factory=dict)

    def order(self) -> list[str]:
        """Servers to try this round, in failover order, skipping those backing off.

        When every server is backing off, the one whose backoff ends first is tried anyway: a
        round always makes one attempt, and the poll interval spaces the rounds.
        """
        now = self.clock()
        ready = [s for s in self.servers if self._until.get(s, 0.0) <= now]
        if ready:
            return ready
        return [min(self.servers, key=lambda s: self._until.get(s, 0.0))]

    def failed(self, server: str) -> float:
        """Record a failure; returns the delay before ``server`` is tried again."""
        n = self._failures.get(server, 0) + 1
        self._failures[server] = n
        delay = equal_jitter(n, self.base, self.cap, self.rand)
        self._until[server] = self.clock() + delay
        return delay

    def succeeded(self, server: str) -> None:
        self._failures.pop(server, None)
        self._until.pop(server, None)

    def failures(self, server: str) -> int:
        return self._failures.get(server, 0)
