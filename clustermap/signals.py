"""The one signal queue: handlers only record the signal; the main loop dispatches it.

gunicorn's arbiter pattern, shared by cm-server, cm-sidecar and cmctl (``keepalive``, ``up``): a
handler that did real work could run in the middle of a publish or a gRPC call, so the handler
appends the signal number to a queue and nothing else. The wake-up pipe is
:func:`signal.set_wakeup_fd`'s, written by the interpreter itself the moment the signal arrives,
so :meth:`SignalQueue.wait` returns at once even while the handler has not run yet. Other threads
may wake the loop too (:meth:`SignalQueue.wake`). Main thread only, like :func:`signal.signal`.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections import deque
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any

__all__ = ["SignalQueue"]


class SignalQueue:
    """Queued signals (truthy while any is pending) and the pipe that wakes the main loop."""

    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = tuple(signals)
        self._pending: deque[int] = deque()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old: dict[int, Any] = {}
        self._old_fd: int | None = None

    def install(self) -> SignalQueue:
        """Queue :attr:`signals` from now on (and wake :meth:`wait` when one arrives)."""
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in self.signals:
            self._old[sig] = signal.signal(sig, self._queue)
        return self

    def restore(self, *, handlers: bool = True) -> None:
        """Put back the wake-up fd and (unless ``handlers=False``: a process on its way out
        keeps queueing, so a late signal cannot kill it mid-shutdown) the handlers that were
        there before :meth:`install`."""
        if handlers:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            self._old.clear()
        if self._old_fd is not None:
            signal.set_wakeup_fd(self._old_fd)
            self._old_fd = None

    def close(self, *, handlers: bool = True) -> None:
        """:meth:`restore`, then close the pipe."""
        self.restore(handlers=handlers)
        os.close(self._r)
        os.close(self._w)

    def __enter__(self) -> SignalQueue:
        return self.install()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _queue(self, signum: int, frame: FrameType | None) -> None:
        self._pending.append(signum)  # only record it: the main loop acts

    def __bool__(self) -> bool:
        return bool(self._pending)

    def pop(self) -> int | None:
        """The oldest pending signal, or None."""
        return self._pending.popleft() if self._pending else None

    def wake(self) -> None:
        """Cut the main loop's :meth:`wait` short (safe from any thread)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._w, b"\0")

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; a signal or :meth:`wake` ends it early."""
        ready, _, _ = select.select([self._r], [], [], max(seconds, 0.0))
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._r, 512):
                    pass
