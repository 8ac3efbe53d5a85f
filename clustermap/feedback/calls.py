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

from clustermap.feedback import layout as L
from clustermap.model import Node

__all__ = ["Call", "CustomCall", "record"]

_monotonic_ns = time.monotonic_ns
_M = L.WORD_MASK
_OK_DONE = L.OK_DONE
_SHIFT = L.LATENCY_SHIFT
_UNIT = L.LATENCY_UNIT_NS
_NOTHING: tuple[type[BaseException], ...] = ()
_ANY: tuple[type[BaseException], ...] = (Exception,)


def record(words: memoryview, i: int, failed: bool, latency_ns: int, release: int) -> None:
    """One result into the entry whose ``calls`` word is ``words[i]`` (docs/feedback.md);
    ``release`` is 1 when it ends a call counted in flight, 0 for :meth:`ClusterMap.report`."""
    lat = (latency_ns // L.LATENCY_UNIT_NS) << L.LATENCY_SHIFT
    try:
        if not failed:
            words[i] = (words[i] - release + (1 << L.OK_SHIFT) + lat) & _M
            return
        calls = (words[i] - release + lat) & _M
        words[i] = calls
        words[i + 1] = (words[i + 1] + 1) & _M
        ok = (calls >> L.OK_SHIFT) & L.OK_MASK
        streak = words[i + 2]
        run = min((streak & 0xFFFF_FFFF) + 1, 0xFFFF_FFFF) if streak >> 32 == ok else 1
        words[i + 2] = ok << 32 | run
    except (ValueError, OverflowError, IndexError):  # a word someone scribbled on: not ours
        pass


class Call:
    """What :meth:`ClusterMap.call` returns: a context manager for one call (use it once).

    The node is picked when the object is made; it counts in flight from ``__enter__`` to
    ``__exit__``. A successful call costs one store into this process's row at each end.
    """

    __slots__ = ("_failed", "_i", "_t0", "_words", "node")

    #: Exceptions escaping the block that count as a success / as a failure (see module doc).
    ok_exceptions: tuple[type[BaseException], ...] = _NOTHING
    failure_exceptions: tuple[type[BaseException], ...] = _ANY

    node: Node
    _words: memoryview | None
    _i: int
    _t0: int
    _failed: bool | None

    def __enter__(self) -> Node:
        words = self._words
        if words is not None:
            try:
                words[self._i] += 1
            except (ValueError, OverflowError):
                self._words = None
        self._t0 = _monotonic_ns()
        return self.node

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
        words = self._words
        if words is None:
            return
        i = self._i
        failed = self._failed
        if exc_type is None and failed is None:  # the common case, inlined: one store
            try:  # noqa: SIM105 - contextlib.suppress costs a context manager per call
                words[i] = (
                    words[i] + _OK_DONE + ((_monotonic_ns() - self._t0) // _UNIT << _SHIFT)
                ) & _M
            except (ValueError, OverflowError):
                pass
            return
        if failed is None:
            assert exc_type is not None
            if issubclass(exc_type, self.ok_exceptions):
                failed = False
            elif issubclass(exc_type, self.failure_exceptions):
                failed = True
            else:  # interrupted, not judged: only released
                try:  # noqa: SIM105
                    words[i] = (words[i] - 1) & _M
                except (ValueError, OverflowError):
                    pass
                return
        record(words, i, failed, _monotonic_ns() - self._t0, 1)


class CustomCall(Call):
    """A :class:`Call` with its own ``ok_exceptions`` / ``failure_exceptions``."""

    __slots__ = ("failure_exceptions", "ok_exceptions")
