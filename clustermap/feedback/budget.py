"""A retry budget shared by every worker on the machine (Envoy's ``retry_budget`` semantics).

Envoy caps *concurrent* retries at ``budget_percent`` of the active requests, never below
``min_retry_concurrency`` (defaults 20 % and 3). Here "active" means machine-wide: each worker
keeps two counters in the reserved header words of its own feedback row (see
:mod:`clustermap.feedback.layout`)::

    row word 1   requests in flight through the HTTP/gRPC glue of this process
    row word 2   retries in flight of this process

and a retry decision sums them over the rows that a live process holds (an OFD lock test per row
with non-zero counters, so a SIGKILLed worker stops counting at once). Only this process writes
its words, a whole word at a time, from counts it keeps itself; values read from other rows are
untrusted and clamped. The sum is taken only when a retry is considered (after a failure), never
on a successful request, which only stores this process's two words when it starts and ends.

Where the difference from Envoy lies: the budget is one per machine (every service together),
not one per cluster, because a row has room for two words, not one pair per service. When
feedback is off (no sidecar files, every row taken) the counts are this process's only.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from clustermap.feedback import layout as L
from clustermap.feedback.ofd import held

if TYPE_CHECKING:
    from clustermap.client import ClusterMap

__all__ = [
    "DEFAULT_BUDGET_PERCENT",
    "DEFAULT_MIN_RETRY_CONCURRENCY",
    "BudgetRule",
    "RetryBudget",
    "budget_for",
]

#: Envoy's defaults for ``retry_budget``.
DEFAULT_BUDGET_PERCENT: Final = 20.0
DEFAULT_MIN_RETRY_CONCURRENCY: Final = 3
#: Row header words holding this process's counts (words 1..7 of a row are reserved otherwise).
REQUESTS_WORD: Final = 1
RETRIES_WORD: Final = 2
#: More than this in one row is garbage, not load.
_CLAMP: Final = L.MAX_IN_FLIGHT


@dataclass(frozen=True, slots=True)
class BudgetRule:
    """The pure rule: may one more retry start, given what is in flight machine-wide?"""

    percent: float = DEFAULT_BUDGET_PERCENT
    min_concurrency: int = DEFAULT_MIN_RETRY_CONCURRENCY

    def __post_init__(self) -> None:
        if not 0.0 <= self.percent <= 100.0 or self.min_concurrency < 0:
            raise ValueError("retry budget: percent in [0, 100] and min_concurrency >= 0")

    def limit(self, active_requests: int) -> int:
        """Concurrent retries allowed with ``active_requests`` requests in flight."""
        return max(self.min_concurrency, int(active_requests * self.percent / 100.0))

    def allows(self, active_requests: int, active_retries: int) -> bool:
        return active_retries < self.limit(active_requests)


class RetryBudget:
    """This process's counters for one region, and the machine-wide sums. Thread-safe."""

    def __init__(self, cm: ClusterMap) -> None:
        self._cm = cm
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.requests = 0  # this process's requests in flight
        self.retries = 0  # this process's retries in flight
        self._words: memoryview | None = None  # the feedback words our base index belongs to
        self._base = -1  # word index of our row's owner word

    # -- this process's counts ---------------------------------------------------------------

    def begin(self) -> None:
        """A request starts (one or more attempts follow)."""
        with self._lock:
            self._forked()
            self.requests += 1
            self._publish()

    def end(self) -> None:
        with self._lock:
            self._forked()
            self.requests = max(0, self.requests - 1)
            self._publish()

    def try_retry(self, rule: BudgetRule) -> bool:
        """Take one retry if ``rule`` allows it; :meth:`retry_done` gives it back."""
        with self._lock:
            self._forked()
            requests, retries = self._totals()
            if not rule.allows(requests, retries):
                return False
            self.retries += 1
            self._publish()
            return True

    def retry_done(self) -> None:
        with self._lock:
            self._forked()
            self.retries = max(0, self.retries - 1)
            self._publish()

    def active(self) -> tuple[int, int]:
        """(requests, retries) in flight on the machine (this process only if feedback is off)."""
        with self._lock:
            self._forked()
            return self._totals()

    # -- the shared words --------------------------------------------------------------------

    def _forked(self) -> None:
        if self._pid != os.getpid():  # the parent's calls in flight are not ours
            self._pid = os.getpid()
            self.requests = self.retries = 0
            self._words = None
            self._base = -1

    def _row(self) -> tuple[memoryview, int] | None:
        fb = self._cm._feedback_state()
        if not fb.ready() or fb.words is None or fb.row < 0:
            return None
        words = fb.words
        if words is not self._words:
            head = _header(words)
            if head is None or fb.row >= head.rows:
                return None
            self._words = words
            self._base = L.row_offset(head, fb.row) // 8
        return words, self._base

    def _publish(self) -> None:
        row = self._row()
        if row is None:
            return
        words, base = row
        try:
            words[base + REQUESTS_WORD] = self.requests
            words[base + RETRIES_WORD] = self.retries
        except (ValueError, IndexError):
            pass

    def _totals(self) -> tuple[int, int]:
        row = self._row()
        if row is None:
            return self.requests, self.retries
        words, mine = row
        head = _header(words)
        fd = self._cm._feedback_state()._fd
        if head is None or fd < 0:
            return self.requests, self.retries
        requests, retries = self.requests, self.retries
        size = head.row_size
        for r in range(head.rows):
            base = L.row_offset(head, r) // 8
            if base == mine or words[base] == 0:
                continue
            req, ret = words[base + REQUESTS_WORD], words[base + RETRIES_WORD]
            if (req or ret) and held(fd, base * 8, size):
                requests += min(req, _CLAMP)
                retries += min(ret, _CLAMP)
        return requests, retries


def _header(words: memoryview) -> L.FeedbackHeader | None:
    try:
        return L.parse_feedback_header(words[: L.HEADER_SIZE // 8].tobytes(), len(words) * 8)
    except L.LayoutError:
        return None


_budgets: weakref.WeakKeyDictionary[ClusterMap, RetryBudget] = weakref.WeakKeyDictionary()
_budgets_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _budgets_lock
    _budgets_lock = threading.Lock()  # another thread may have held a lock at the fork
    for b in list(_budgets.values()):
        b._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def budget_for(cm: ClusterMap) -> RetryBudget:
    """The one budget of this process for ``cm``'s region (every session shares it)."""
    with _budgets_lock:
        b = _budgets.get(cm)
        if b is None:
            b = _budgets[cm] = RetryBudget(cm)
        return b
