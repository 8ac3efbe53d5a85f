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

Two settings make a Watch fan-out (one message to each of thousands of streams) cheaper; both
measured in docs/performance.md §4b:

* :func:`coalesce_grpc_wakeups`: grpc.aio's completion-queue poller thread writes one byte to a
  socketpair per completed operation, and the loop's reader takes one byte per call (then runs
  every queued completion). 5 000 writes completing meant up to 5 000 loop passes, each an
  ``epoll_wait``, a reader call and a ``recv`` that mostly found nothing queued. The reader is
  wrapped to drop the surplus bytes first: one pass per burst. The queue is drained as before,
  so no completion waits; if grpc's internals look different, nothing is changed;
* :func:`tune_gc`: every message allocates a few tracked objects (futures, batch tags, coroutine
  frames) that live until its write completes; at the default gen-0 threshold (700) a fan-out
  ran dozens of collections that traversed thousands of live streams' objects each, and at
  50 000 still one of 23-58 ms per fan-out to 5 000 streams (``GC_THRESHOLDS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import gc
import os
import stat
import struct
import termios
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, ParamSpec, TypeVar

__all__ = ["LoopThread", "coalesce_grpc_wakeups", "tune_gc"]

# gen-0 threshold: counts tracked objects allocated less those freed. A fan-out holds ~10 per
# stream until its write completes (~50 000 at 5 000 streams): at 50 000 nearly every fan-out
# ran a gen-0 collection of 23-58 ms in the middle of its writes; at 200 000 none does up to
# ~15 000 streams, and cyclic garbage still waits for at most 200 000 objects (default: 700)
GC_THRESHOLDS: Final = (200_000, 20, 20)

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


def tune_gc() -> None:
    """Freeze what start-up made (modules, descriptors: never garbage, no longer traversed) and
    raise the collection thresholds (see the module docstring). Called once the server is built."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def coalesce_grpc_wakeups(loop: asyncio.AbstractEventLoop) -> bool:
    """Wrap grpc.aio's completion reader on ``loop`` so that one call consumes every pending
    wake-up byte (see the module docstring). Call on the loop, after the server started.
    True if the reader was found and wrapped."""
    selector = getattr(loop, "_selector", None)
    if selector is None:
        return False
    for key in list(selector.get_map().values()):
        reader = key.data[0] if isinstance(key.data, tuple) and key.data else None
        callback: Callable[[], object] = getattr(reader, "_callback", None) or _nothing
        if getattr(getattr(callback, "func", None), "__name__", "") != "_handle_events":
            continue
        if getattr(reader, "_args", ()):
            return False
        fd = key.fd
        if not isinstance(fd, int) or not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False  # not the socketpair this is written for: leave it alone
        loop.remove_reader(fd)
        loop.add_reader(fd, _drain_then, fd, callback, bytearray(4))
        return True
    return False


def _nothing() -> None:
    pass


def _drain_then(fd: int, handle_events: Callable[[], object], count: bytearray) -> None:
    """Leave one of the pending wake-up bytes for ``handle_events`` (it reads one, then runs
    every queued completion, including those whose bytes were dropped here)."""
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.FIONREAD, count)
        pending = struct.unpack("i", count)[0]
        if pending > 1:
            os.read(fd, pending - 1)
    handle_events()
