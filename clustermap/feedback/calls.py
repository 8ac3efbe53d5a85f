"""``with clustermap.call(...) as node``: one call to a picked node, counted and judged.

The call is counted in flight in this process's row from ``__enter__`` to ``__exit__`` (so
least_request on every worker of the machine sees it), then recorded as a success or a failure.
No clock is read: the sidecar, which samples every node's calls in flight at each sweep, derives
the latency from them (Little's law, :mod:`clustermap.sidecar.latency`). Which outcome:

* :meth:`Call.mark_failed` / :meth:`Call.mark_ok` inside the block decide it explicitly;
* otherwise an exception escaping the block that is an instance of ``failure_exceptions``
  (default: any :class:`Exception`) and not of ``ok_exceptions`` (default: none) is a failure;
* an exception outside both (``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``, gevent's
  ``Timeout`` and ``GreenletExit``, which derive from ``BaseException``) records nothing: the
  call is released without a verdict on the node;
* no exception is a success.

Feedback never raises into the caller: if the counters cannot be written the block runs as a
plain pick.

The hot path is shaped by its cost (docs/performance.md §6): a successful call touches one
float64 word (``calls``, :mod:`~clustermap.feedback.layout`), whose arithmetic needs no
multi-digit integers, once when it starts and once when it ends; and a plain :class:`Call` goes
back to a free list when its block ends, so the next ``call()`` does not allocate one.
"""

from __future__ import annotations

from types import TracebackType

from clustermap.feedback import layout as L
from clustermap.model import Node

__all__ = ["Call", "CustomCall", "free_calls", "record"]

_OK_DONE = L.OK_DONE
_WRAP = L.CALLS_WRAP
_NOTHING: tuple[type[BaseException], ...] = ()
_ANY: tuple[type[BaseException], ...] = (Exception,)

#: Plain :class:`Call` objects whose block has ended, for ``ClusterMap.call`` to reuse (its
#: ``pop`` and this ``append`` are atomic under the GIL, so threads may share the list).
free_calls: list[Call] = []


def record(
    words: memoryview, floats: memoryview[float], i: int, failed: bool, latency: float, release: int
) -> None:
    """One result into the entry whose ``calls`` word is ``floats[i]`` (docs/feedback.md);
    ``words`` is the same file as unsigned words. ``release`` is 1 when the result ends a call
    counted in flight (its time is in the sidecar's samples: ``latency`` 0), 0 for
    :meth:`ClusterMap.report`, whose ``latency`` (seconds) is added to the latency word."""
    try:
        calls = floats[i] - release + (0.0 if failed else L.OK_ONE)
        if calls >= _WRAP:
            calls -= _WRAP
        floats[i] = calls
        if latency:
            floats[i + 1] += latency
        if not failed:
            return
        words[i + 2] = (words[i + 2] + 1) & L.WORD_MASK
        ok = L.successes(calls) & 0xFFFF_FFFF
        streak = words[i + 3]
        run = min((streak & 0xFFFF_FFFF) + 1, 0xFFFF_FFFF) if streak >> 32 == ok else 1
        words[i + 3] = ok << 32 | run
    except (ValueError, OverflowError, IndexError, TypeError):  # a word scribbled on: not ours
        pass


class Call:
    """What :meth:`ClusterMap.call` returns: a context manager for one call (use it once; a plain
    Call is recycled for a later ``call()`` when its block ends).

    The node is picked when the object is made; it counts in flight from ``__enter__`` to
    ``__exit__``. A successful call adds to one word of this process's row when it starts and
    to the same word when it ends.
    """

    __slots__ = ("_failed", "_i", "_w", "node")

    #: Exceptions escaping the block that count as a success / as a failure (see module doc).
    ok_exceptions: tuple[type[BaseException], ...] = _NOTHING
    failure_exceptions: tuple[type[BaseException], ...] = _ANY

    node: Node
    #: This process's feedback row as float64 words, or None (feedback off for this call).
    _w: memoryview[float] | None
    _i: int
    _failed: bool | None

    def __enter__(self) -> Node:
        w = self._w
        if w is not None:
            try:
                w[self._i] += 1.0
            except (ValueError, TypeError):  # (a released view: nothing to count into)
                self._w = None
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
        w = self._w
        if w is not None and exc_type is None and self._failed is None:
            # The common case, inlined: one success and one call fewer.
            i = self._i
            try:
                calls = w[i] + _OK_DONE
                w[i] = calls if calls < _WRAP else calls - _WRAP
            except (ValueError, TypeError):
                pass
            free_calls.append(self)
            return
        failed = self._failed
        self._failed = None
        if w is not None:
            self._judged(w, failed, exc_type)
        free_calls.append(self)

    def _judged(
        self, w: memoryview[float], failed: bool | None, exc_type: type[BaseException] | None
    ) -> None:
        i = self._i
        if failed is None:
            if exc_type is None or issubclass(exc_type, self.ok_exceptions):
                failed = False
            elif issubclass(exc_type, self.failure_exceptions):
                failed = True
            else:  # interrupted, not judged: only released
                try:  # noqa: SIM105 - contextlib.suppress costs a context manager per call
                    w[i] -= 1.0
                except (ValueError, TypeError):
                    pass
                return
        words = w.obj
        record(memoryview(words).cast("Q"), w, i, failed, 0.0, 1)


class CustomCall(Call):
    """A :class:`Call` with its own ``ok_exceptions`` / ``failure_exceptions`` (not recycled)."""

    __slots__ = ("failure_exceptions", "ok_exceptions")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failed = self._failed
        self._failed = None
        if self._w is not None:
            self._judged(self._w, failed, exc_type)


# Never empty in a single-threaded worker: a list that shrinks to nothing and grows again
# reallocates its storage on every call (300 instructions, a third of a bare call).
free_calls.extend(object.__new__(Call) for _ in range(8))
for _c in free_calls:
    _c._failed = None
del _c
