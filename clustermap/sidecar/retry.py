"""Failover order and per-server exponential backoff with full jitter (pure; clock injectable).

Each server has its own backoff: a failure makes it wait ``base * 2**(failures-1)`` (capped at
``cap``), scaled by a random factor in [0.5, 1.0] so that a fleet of sidecars that lost a server at
the same instant does not return to it in lockstep (consul #5417). A round tries the servers in
the configured order, skipping those still backing off, so the first server is used again as soon
as its backoff has passed and it answers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass(slots=True)
class Backoff:
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
        delay = min(self.cap, self.base * 2.0 ** (n - 1)) * (0.5 + 0.5 * self.rand())
        self._until[server] = self.clock() + delay
        return delay

    def succeeded(self, server: str) -> None:
        self._failures.pop(server, None)
        self._until.pop(server, None)

    def failures(self, server: str) -> int:
        return self._failures.get(server, 0)
