"""Watch streams on the event loop: one coroutine per stream, no thread per stream.

How a change reaches thousands of streams:

* one **follower** thread (``cm-watch``) blocks in :meth:`Registry.wait_changed` and hands each
  new revision to the loop with ``call_soon_threadsafe`` (it never touches loop state itself).
  Before it does, it computes the answers most streams need (the delta from the previous
  revision, NOT_MODIFIED at the new one). Answers are kept until the next change, which the
  follower also signals when the self-preservation flag flips or the store becomes unavailable
  (checked every second), so a keepalive costs no registry call. While no stream is open and
  the loop keeps no answer, it does not wake the loop at all;
* on the loop, :meth:`WatchHub._changed` stores those answers and resolves every idle stream's
  own wake-up future (a stream waits on a private future, woken by a change or by its keepalive
  timer, so a cancelled stream never cancels anything shared);
* each woken stream takes the answer for its own (epoch, revision, filter). Other questions are
  computed in the blocking pool (registry call + encoding) **once per question**: streams at
  the same (epoch, revision, filter) share one future and then write the same serialized bytes
  (the Subscription service is registered with a pass-through serializer), so nothing is
  encoded per stream.

Slow consumers are bounded by construction: a stream has at most one message in flight (its
``context.write`` is awaited before it asks again). Revisions that pass meanwhile are not
queued; when the write completes the stream asks for the delta from the revision it last sent
(a full map when the change log no longer reaches back), so a slow stream is collapsed to the
latest state and costs one message of memory at most.

Keepalives: a stream that has sent nothing for ``keepalive`` seconds (less up to 10 %, drawn per
stream so that streams opened together spread out, then rounded up to a whole second so that
the keepalives of one second go out in one batch: alone, each would cost a round of thread
wake-ups in gRPC) is sent NOT_MODIFIED. Idle streams' futures are filed by that second, and one
loop timer per second (not one per stream, created and cancelled on every message) wakes
them. At most ``max_streams`` streams are held; one more is refused RESOURCE_EXHAUSTED at once.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import grpc

from clustermap import trace
from clustermap.model import NOT_MODIFIED, NOT_READY
from clustermap.server.registry import PollResult, Registry, Unavailable
from clustermap.server.serving import LoopThread

__all__ = ["Answer", "WatchHub"]

_NOTHING: Final = frozenset[str]()
_TICK: Final = 1.0  # keepalives are batched on this grid (seconds)

Answer = tuple[PollResult, bytes]
_Key = tuple[str, int, frozenset[str] | None]


class WatchHub:
    """The Watch streams of one server (see the module docstring). Loop-side methods run on
    the loop only; :meth:`start` and :meth:`close` may be called from any thread."""

    def __init__(
        self,
        registry: Registry,
        loop: LoopThread,
        answer: Callable[[str, int, frozenset[str] | None], Answer],
        *,
        keepalive: float = 15.0,
        max_streams: int = 10_000,
        on_answer: Callable[[str], None] | None = None,
        on_stream: Callable[[int], None] | None = None,
    ) -> None:
        self._on_stream = on_stream
        self._registry = registry
        self._loop = loop
        self._answer_blocking = answer
        self._keepalive = keepalive
        self.max_streams = max_streams
        self._on_answer = on_answer
        self.streams = 0
        self._opened = 0  # streams ever opened (read by the follower: see _follow)
        self._closed = False
        self._generation = 0  # bumped on every change
        # idle streams' wake-ups, by the time their keepalive is due: a change resolves them all,
        # one timer per due time (not per stream) resolves its own when it fires
        self._idle: dict[float, set[asyncio.Future[None]]] = {}
        self._timed: set[float] = set()  # due times with a timer (one each, across changes)
        self._answers: dict[_Key, asyncio.Future[Answer]] = {}  # until the next change
        self._follower = threading.Thread(target=self._follow, name="cm-watch", daemon=True)

    # -- any thread -----------------------------------------------------------------------

    def start(self) -> None:
        self._follower.start()

    def close(self) -> None:
        """End every stream (after :meth:`Registry.close`, the follower stops by itself)."""
        self._loop.call_soon(self._close)

    # -- the follower thread -------------------------------------------------------------

    def _follow(self) -> None:
        seen: tuple[str, int, bool] = ("", -1, False)  # epoch, revision, self-preservation
        lost = False
        # (streams opened so far) when the loop was last told of a change with no stream open
        # and no answer made: every answer it kept was then dropped, and while no stream opens
        # it keeps none, so a change concerns no one there and need not wake it (a burst of
        # registrations would otherwise wake the loop once per revision)
        quiet: int | None = None
        while not self._registry.closed:
            self._registry.wait_changed(seen[1], 1.0)
            if self._registry.closed:
                break
            try:
                now = self._registry.poll("", 0, _NOTHING)  # cheap: the filter names nothing
                state = (now.epoch, now.revision, now.self_preservation)
                if state == seen and not lost:
                    continue  # a timeout: nothing new (this wake-up notices flags and a lost store)
                trace.mark("server.follower", now.revision)
                # the answers most streams need, made here before they wake so that they find
                # them ready: the delta from the previous revision, and NOT_MODIFIED at this one.
                # Not while no stream is open (a racing new one asks for its own): a burst of
                # registrations would otherwise encode a delta per revision that no one reads.
                ready = [((now.epoch, now.revision, None), None)] if self.streams else []
                if ready and seen[1] >= 0 and now.revision != seen[1]:
                    ready.append(((seen[0], seen[1], None), None))
                answers = [(key, self._answer_blocking(*key)) for key, _ in ready]
                trace.mark("server.encoded", now.revision)
            except Unavailable:
                if not lost:  # every stream asks again now, and is told UNAVAILABLE
                    lost = True
                    self._loop.call_soon(self._changed, ())
                time.sleep(0.2)
                continue
            lost = False
            seen = state
            opened = self._opened
            if not self.streams and quiet == opened:
                continue
            self._loop.call_soon(self._changed, tuple(answers))
            quiet = None if self.streams or answers else opened
        self._loop.call_soon(self._close)

    # -- the loop -------------------------------------------------------------------------

    def _changed(self, ready: tuple[tuple[_Key, Answer], ...] = ()) -> None:
        if ready:
            trace.mark("server.loop", ready[0][1][0].revision)
        self._answers.clear()
        for key, answer in ready:
            if answer[0].kind == NOT_READY:
                continue  # asked again after its retry_after, never kept
            fut = self._loop.loop.create_future()
            fut.set_result(answer)
            self._answers[key] = fut
        self._generation += 1
        idle, self._idle = self._idle, {}
        for wakes in idle.values():
            for wake in wakes:
                if not wake.done():
                    wake.set_result(None)

    def _due(self, due: float) -> None:
        """Keepalive timer: wake the streams idle until ``due`` (those a change has not)."""
        self._timed.discard(due)
        for wake in self._idle.pop(due, ()):
            if not wake.done():
                wake.set_result(None)

    def _close(self) -> None:
        self._closed = True
        self._changed()

    def _cached(self, key: _Key) -> Answer | None:
        """The answer to ``key`` if it is ready (the common case after a change: no waiting)."""
        hit = self._answers.get(key)
        if hit is not None and hit.done() and hit.exception() is None:
            return hit.result()
        return None

    def current(self, epoch: str, revision: int) -> Answer | None:
        """The cached answer for a whole-map subscriber at (``epoch``, ``revision``) if it is
        up to date with the registry (read without the lock), else None: the polls' fast path,
        with no registry call. The answers the follower makes (NOT_MODIFIED at the current
        revision, the delta from the previous one) are the ones most polls ask for. Flags
        (self-preservation, a lost store) reach the cache within the follower's second, as
        they reach keepalives."""
        answer = self._cached((epoch, revision, None))
        if answer is None or answer[0].revision != self._registry.revision:
            return None
        return answer

    async def _answer(self, epoch: str, revision: int, names: frozenset[str] | None) -> Answer:
        key = (epoch, revision, names)
        hit = self._answers.get(key)
        if hit is None or hit.done():
            hit = asyncio.ensure_future(
                self._loop.run_blocking(self._answer_blocking, epoch, revision, names)
            )
            self._answers[key] = hit
            hit.add_done_callback(lambda f: self._settled(key, f))
        return await asyncio.shield(hit)

    def _settled(self, key: _Key, fut: asyncio.Future[Answer]) -> None:
        """Errors and NOT_READY answers are not kept: the next asker asks the registry."""
        if self._answers.get(key) is fut and (
            fut.cancelled() or fut.exception() is not None or fut.result()[0].kind == NOT_READY
        ):
            del self._answers[key]

    async def serve(
        self, epoch: str, revision: int, names: frozenset[str] | None, context: Any
    ) -> None:
        """Hold one stream until the client leaves or the server stops."""
        if self.streams >= self.max_streams:
            if self._on_stream is not None:
                self._on_stream(0)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this server holds at most {self.max_streams} Watch streams (--max-watchers); "
                "poll, or retry later",
            )
        self.streams += 1
        self._opened += 1
        if self._on_stream is not None:
            self._on_stream(1)
        try:
            await self._stream(epoch, revision, names, context)
        finally:
            self.streams -= 1
            if self._on_stream is not None:
                self._on_stream(-1)

    async def _stream(
        self, epoch: str, revision: int, names: frozenset[str] | None, context: Any
    ) -> None:
        loop = self._loop.loop
        answers = self._answers
        idle = self._idle
        on_answer = self._on_answer
        last_sent = float("-inf")
        last_kind = ""
        # each stream's own period, up to 10 % shorter: streams opened together (a fleet
        # reconnecting) do not send their keepalives in one burst forever after
        keepalive = self._keepalive * (1.0 - 0.1 * random.random())
        key = (epoch, revision, names)
        while not self._closed:
            generation = self._generation  # taken first: a change while we answer is not lost
            hit = answers.get(key)
            if hit is not None and hit.done() and hit.exception() is None:
                answer = hit.result()  # the common case after a change: ready, no waiting
            else:
                try:
                    answer = await self._answer(*key)
                except Unavailable as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                    return
            result, data = answer
            now = loop.time()
            if now - last_sent >= keepalive or result.kind not in (NOT_MODIFIED, last_kind):
                trace.mark("server.write", result.revision)
                await context.write(data)
                trace.mark("server.written", result.revision)
                if on_answer is not None:
                    on_answer(result.kind)
                last_sent, last_kind = now, result.kind
            if result.kind == NOT_READY:
                due = loop.time() + min(keepalive, result.retry_after + 0.01)
            else:
                key = (result.epoch, result.revision, names)
                last_kind = ""
                # on a whole-second grid: the keepalives due within a second go out together,
                # in one pass of the loop (one wake-up of gRPC's threads, not one per stream)
                due = max(math.ceil((last_sent + keepalive) / _TICK) * _TICK, now + 0.01)
            if generation != self._generation or self._closed:
                continue
            if idle is not self._idle:  # a change swapped the table (and woke its streams)
                idle = self._idle
            # wait for the next change or the keepalive: a private future (a cancelled stream
            # cancels only its own), in the table of its due time, woken by whichever comes first
            wake = loop.create_future()
            wakes = idle.get(due)
            if wakes is None:
                idle[due] = {wake}
                if due not in self._timed:
                    self._timed.add(due)
                    loop.call_at(due, self._due, due)
            else:
                wakes.add(wake)
            try:
                await wake
            except asyncio.CancelledError:  # the client left: forget its wake-up now
                idle.get(due, set()).discard(wake)
                raise
