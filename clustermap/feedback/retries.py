"""One request's attempts at the nodes of a service: picks, retries elsewhere, the budget.

Shared by :mod:`clustermap.http` and :mod:`clustermap.grpc`; the protocol modules decide *whether*
a failure may be retried (their policy), this module decides *where* (a node not tried yet,
picked by the map, so ejected and unhealthy nodes are skipped), *when* (jittered backoff) and
*whether the machine can afford it* (:mod:`clustermap.feedback.budget`). Each attempt is a
:meth:`ClusterMap.call`, so it is counted in flight and judged in the shared feedback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from clustermap.errors import ClusterMapError
from clustermap.feedback.budget import BudgetRule, RetryBudget, budget_for
from clustermap.retry import full_jitter

if TYPE_CHECKING:
    from clustermap.client import ClusterMap
    from clustermap.feedback.calls import Call

__all__ = ["Attempts", "Outcome", "RequestFailed", "jittered_backoff", "with_tried"]

A = TypeVar("A")

#: Picks drawn to find a node not tried yet before giving up on retrying.
_DRAWS = 8


#: Full jitter: uniform(0, min(cap, base * 2**(retry-1))) seconds before retry ``retry``.
jittered_backoff = full_jitter


class RequestFailed(Exception):
    """The last error of a request to a service, after every attempt it was allowed.

    The exception raised is the HTTP/gRPC library's own (``requests.ConnectionError``,
    ``httpx.ConnectError``, ``grpc.RpcError``...) with this class mixed in, so both
    ``except requests.ConnectionError`` and ``except clustermap.http.RequestFailed`` catch it.
    ``tried`` lists the nodes tried, in order, as ``"HOST:PORT"``; ``service`` the service.
    """

    tried: tuple[str, ...] = ()
    service: str = ""


_mixed: dict[type[BaseException], type[BaseException]] = {}


def with_tried(exc: BaseException, service: str, tried: Sequence[str]) -> BaseException:
    """``exc`` as a :class:`RequestFailed` too (same object, class swapped for a subclass of
    both), carrying ``tried``; the attributes are set even where the class cannot change."""
    cls = type(exc)
    if not isinstance(exc, RequestFailed):
        sub = _mixed.get(cls)
        if sub is None:
            try:
                sub = type(cls.__name__, (cls, RequestFailed), {"__module__": cls.__module__})
            except TypeError:  # a final or layout-incompatible class: attributes only
                sub = cls
            _mixed[cls] = sub
        if sub is not cls:
            with contextlib.suppress(TypeError):
                exc.__class__ = sub
    exc.tried = tuple(tried)  # type: ignore[attr-defined]
    exc.service = service  # type: ignore[attr-defined]
    return exc


@dataclass(frozen=True, slots=True)
class Outcome(Generic[A]):
    """One attempt, as the protocol judged it: its answer or its error, and whether the
    protocol's policy allows another attempt after it (the budget and the node are asked by
    :class:`Attempts`)."""

    answer: A | None = None
    error: BaseException | None = None
    retry: bool = False


class Attempts:
    """The attempts of one request to ``service``; :meth:`close` when the request is over.

    The request counts as active in the machine's retry budget from construction to
    :meth:`close`; each retry holds one unit of the budget while it runs.
    """

    __slots__ = (
        "_budget",
        "_holding",
        "_key",
        "_map",
        "_rule",
        "_strategy",
        "_subset",
        "retries",
        "service",
        "tried",
    )

    def __init__(
        self,
        cm: ClusterMap,
        service: str,
        key: str | bytes | None,
        strategy: str | None,
        subset: dict[str, str] | None,
        rule: BudgetRule,
    ) -> None:
        self._map = cm
        self.service = service
        self._key = key
        self._strategy = strategy
        self._subset = subset
        self._rule = rule
        self._budget: RetryBudget = budget_for(cm)
        self._holding = False
        self.retries = 0
        self.tried: list[str] = []
        self._budget.begin()

    def first(self) -> Call:
        """The first attempt's call (raises the map's errors: UnknownService, NoAvailableNode)."""
        call = self._map.call(self.service, self._key, self._strategy, self._subset)
        self.tried.append(call.node.address)
        return call

    def retry(self, allowed: bool) -> Call | None:
        """After a failed attempt: the next attempt's call on a node not tried yet, or None
        when ``allowed`` is False, no other node can be picked, or the budget is spent."""
        self._release()
        if not allowed:
            return None
        call = self._other_node()
        if call is None or not self._budget.try_retry(self._rule):
            return None
        self._holding = True
        self.retries += 1
        self.tried.append(call.node.address)
        return call

    def _other_node(self) -> Call | None:
        # A keyed pick would return the same node again: retries draw at random then.
        first = [] if self._key is not None else [self._strategy, self._strategy]
        for strategy in [*first, *["random"] * (_DRAWS - len(first))]:
            try:
                call = self._map.call(self.service, None, strategy, self._subset)
            except (ClusterMapError, ValueError, TypeError):
                return None
            if call.node.address not in self.tried:
                return call
        return None

    def fail(self, exc: BaseException) -> BaseException:
        """``exc`` marked with the nodes tried, to raise to the caller."""
        return with_tried(exc, self.service, self.tried)

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self._budget.retry_done()

    def close(self) -> None:
        self._release()
        self._budget.end()

    # -- the loop, once for blocking and once for asyncio callers -----------------------------

    def run(
        self,
        attempt: Callable[[Call], Outcome[A]],
        backoff: Callable[[int], float],
        discard: Callable[[A], object] = lambda _: None,
    ) -> A:
        """Attempts until one may not be retried: ``attempt`` sends the request through the
        given call (inside ``with call``) and judges it; a retried answer is ``discard``-ed (its
        connection released) and the next attempt waits ``backoff(retries)`` seconds. Returns
        the last answer or raises the last error marked with the nodes tried; closes."""
        try:
            call = self.first()
            while True:
                outcome = attempt(call)
                nxt = self.retry(outcome.retry)
                if nxt is None:
                    return self._last(outcome)
                if outcome.answer is not None:
                    discard(outcome.answer)
                time.sleep(backoff(self.retries))
                call = nxt
        finally:
            self.close()

    async def run_async(
        self,
        attempt: Callable[[Call], Awaitable[Outcome[A]]],
        backoff: Callable[[int], float],
        discard: Callable[[A], Awaitable[object]] | None = None,
    ) -> A:
        """:meth:`run` for coroutines: the same loop, awaiting the attempt, discard and sleep."""
        try:
            call = self.first()
            while True:
                outcome = await attempt(call)
                nxt = self.retry(outcome.retry)
                if nxt is None:
                    return self._last(outcome)
                if outcome.answer is not None and discard is not None:
                    await discard(outcome.answer)
                await asyncio.sleep(backoff(self.retries))
                call = nxt
        finally:
            self.close()

    def _last(self, outcome: Outcome[A]) -> A:
        if outcome.error is not None:
            raise self.fail(outcome.error)
        assert outcome.answer is not None
        return outcome.answer
