"""The event loop that serves gRPC, in a thread of its own, and the pool for blocking work.

cm-server's main thread keeps its own loop (signals, the expiry tick, health when warm-up ends);
the ``grpc.aio`` server lives on an asyncio event loop run by one thread (``cm-loop``), created
and used only there (grpc.aio objects belong to the thread that made them). Other threads hand
work to it only through :meth:`LoopThread.call` (a coroutine, waited for) and
:meth:`LoopThread.call_soon` (a callback), both ``*_threadsafe`` underneath: no thread ever
touches the loop's state directly (DESIGN §4, seed 000).

Blocking work — registry calls (its lock; with etcd, network round trips), encoding answers,
probes — never runs on the loop: coroutines hand it to :attr:`LoopThread.pool`, a bounded
thread pool (``--max-workers``), with :meth:`LoopThread.run_blocking`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

__all__ = ["LoopThread"]

P = ParamSpec("P")
T = TypeVar("T")


class LoopThread:
    """An asyncio loop running in thread ``cm-loop`` until :meth:`stop`, plus the blocking pool."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cm-work")
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(self.pool)
        self._thread = threading.Thread(target=self._run, name="cm-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop from another thread and return its result (or raise)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        """Schedule ``fn(*args)`` on the loop from any thread (ignored once the loop is closed)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
            self.loop.call_soon_threadsafe(fn, *args)

    async def run_blocking(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``fn(*args, **kwargs)`` run in the pool (from a coroutine on the loop)."""
        return await self.loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def stop(self) -> None:
        """Stop the loop, join its thread, and drop queued blocking work."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if not self._thread.is_alive():
            self.loop.close()
