"""``with clustermap.call(...) as node``: one call to a picked node, counted and judged.

The call is counted in flight in this process's row from ``__enter__`` to ``__exit__`` (so
least_request on every worker of the machine sees it), then recorded as a success or a failure
with its latency. Which outcome:

* :meth:`Call.mark_failed` / :meth:`Call.mark_ok` inside the block decide it explicitly;
* otherwise an exception escaping the block that is an instance of ``failure_exceptions``
  (default: any :class:`Exception`) and not of ``ok_exceptions`` (default: none) is a failure;
* an exception outside both (``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``, gevent's
  ``Timeout`` and ``GreenletExit``, which derive from ``BaseException``) records nothing: the
  call is released without a verdict on the node;
* no exception is a success.

Feedback never raises into the caller: if the counters cannot be written the block runs as a
plain pick.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING

from clustermap.model import Node

if TYPE_CHECKING:
    from clustermap.client import ClusterMap

__all__ = ["Call", "record"]

_monotonic_ns = time.monotonic_ns
_NOTHING: tuple[type[BaseException], ...] = ()
_ANY: tuple[type[BaseException], ...] = (Exception,)


def record(words: memoryview, i: int, failed: bool, latency_us: int) -> None:
    """One result into the entry whose ``in flight`` word is ``words[i]`` (without touching
    ``in flight``). Counters only grow; the streak counts failures since our last success."""
    try:
        if failed:
            words[i + 2] += 1
            words[i + 3] += 1
        else:
            words[i + 1] += 1
            words[i + 3] = 0
        words[i + 4] += latency_us
    except (ValueError, OverflowError):  # a word someone else scribbled on: never our problem
        pass


class Call:
    """The context manager :meth:`ClusterMap.call` returns; reusable only once."""

    __slots__ = (
        "_failed",
        "_i",
        "_key",
        "_map",
        "_service",
        "_strategy",
        "_subset",
        "_t0",
        "_words",
        "failure_exceptions",
        "node",
        "ok_exceptions",
    )

    def __init__(
        self,
        cm: ClusterMap,
        service: str,
        key: str | bytes | None,
        strategy: str | None,
        subset: dict[str, str] | None,
        ok_exceptions: tuple[type[BaseException], ...] = _NOTHING,
        failure_exceptions: tuple[type[BaseException], ...] = _ANY,
    ) -> None:
        self._map = cm
        self._service = service
        self._key = key
        self._strategy = strategy
        self._subset = subset
        self.ok_exceptions = ok_exceptions
        self.failure_exceptions = failure_exceptions
        self._failed: bool | None = None

    def __enter__(self) -> Node:
        node, words, i = self._map._begin_call(
            self._service, self._key, self._strategy, self._subset
        )
        self.node = node
        self._words = words
        self._i = i
        self._t0 = _monotonic_ns()
        return node

    def mark_failed(self) -> None:
        """Record this call as a failure even if the block ends normally (e.g. an HTTP 503)."""
        self._failed = True

    def mark_ok(self) -> None:
        """Record this call as a success even if an exception escapes the block."""
        self._failed = False

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        i = self._i
        words = self._words
        if words is None:
            return
        try:
            words[i] -= 1
        except (ValueError, OverflowError):
            return
        failed = self._failed
        if failed is None:
            if exc_type is None or issubclass(exc_type, self.ok_exceptions):
                failed = False
            elif issubclass(exc_type, self.failure_exceptions):
                failed = True
            else:
                return  # interrupted, not judged
        record(words, i, failed, (_monotonic_ns() - self._t0) // 1000)
