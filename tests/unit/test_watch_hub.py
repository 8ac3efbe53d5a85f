"""The Watch hub's idle streams on a real registry and loop (the gRPC context is a recorder):
a change reaches every stream, keepalives come from one timer per due second, and a stream
that leaves takes its wake-up with it instead of leaving it for the next change."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from clustermap._pb.clustermap.v1 import subscription_pb2 as spb
from clustermap.server.registry import Registry
from clustermap.server.servicers import SubscriptionServicer
from clustermap.server.serving import LoopThread
from clustermap.server.store import MemoryStore
from clustermap.server.validation import Registration

STREAMS = 40
DEADLINE = 60.0  # generous: the machine is shared


class _Recorder:
    """What a stream was sent (its ``write`` completes at once, as a fast reader's would)."""

    def __init__(self) -> None:
        self.kinds: list[int] = []

    async def write(self, data: bytes) -> None:
        self.kinds.append(spb.PollResponse.FromString(data).kind)

    async def abort(self, code: object, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


def _await(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class _Hub:
    """A hub on a real registry and loop, with ``STREAMS`` recorded streams open."""

    def __init__(self, keepalive: float) -> None:
        self.registry = Registry(MemoryStore(epoch="E"), warmup=0)
        self.loop = LoopThread(2)
        self.hub = SubscriptionServicer(self.registry, self.loop, keepalive=keepalive).hub
        self.hub.start()
        self.contexts = [_Recorder() for _ in range(STREAMS)]

        async def open_all() -> list[asyncio.Task[None]]:
            return [
                asyncio.ensure_future(self.hub.serve("", 0, None, ctx)) for ctx in self.contexts
            ]

        self.tasks = self.loop.call(open_all())
        _await(lambda: all(c.kinds[:1] == [spb.POLL_KIND_FULL] for c in self.contexts), "full maps")

    def filed(self) -> int:
        """Wake-ups filed in the hub's idle table, those of streams that left included."""

        async def count() -> int:
            return sum(len(wakes) for wakes in self.hub._idle.values())

        return self.loop.call(count())

    def close(self) -> None:
        self.registry.close()
        self.hub.close()
        self.loop.stop()


def test_a_change_then_keepalives_reach_every_stream() -> None:
    h = _Hub(keepalive=1.0)
    try:
        h.registry.register(Registration(service="svc", host="10.0.0.1", port=80))
        _await(lambda: all(spb.POLL_KIND_DELTA in c.kinds for c in h.contexts), "the delta")
        # nothing changes now: every stream gets keepalives, from the per-second timers
        _await(
            lambda: all(c.kinds[-2:] == [spb.POLL_KIND_NOT_MODIFIED] * 2 for c in h.contexts),
            "two keepalives on every stream",
        )
    finally:
        h.close()


def test_a_stream_that_leaves_takes_its_wakeup_with_it() -> None:
    h = _Hub(keepalive=300.0)  # no keepalive is due while the test runs
    try:
        _await(lambda: h.filed() == STREAMS, "every stream idle")
        leaving = h.tasks[: STREAMS // 2]

        async def cancel() -> None:
            for t in leaving:
                t.cancel()
            await asyncio.gather(*leaving, return_exceptions=True)

        h.loop.call(cancel())
        assert h.hub.streams == STREAMS - len(leaving)
        assert h.filed() == STREAMS - len(leaving)  # not left until their keepalive was due
    finally:
        h.close()
