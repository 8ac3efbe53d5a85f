"""The health Watch stream's last answer: a shutdown that lands while a stream's previous answer
is still being written must still be told to that stream before it ends."""

from __future__ import annotations

import asyncio
import threading
import time

from grpc_health.v1 import health_pb2

from clustermap.server.health import HealthServicer
from clustermap.server.serving import LoopThread

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _SlowWriteContext:
    """A stream whose first write completes only when released (as gRPC reports a sent
    message later than the peer may already have read it, on a loaded machine)."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.writing = threading.Event()
        self.release: asyncio.Event | None = None

    async def write(self, response: health_pb2.HealthCheckResponse) -> None:
        self.sent.append(response.status)
        if len(self.sent) == 1:
            self.release = asyncio.Event()
            self.writing.set()
            await self.release.wait()


def test_shutdown_during_a_write_still_sends_not_serving() -> None:
    loop = LoopThread(2)
    try:
        health = HealthServicer(loop)
        ctx = _SlowWriteContext()
        watch = asyncio.run_coroutine_threadsafe(
            health.Watch(health_pb2.HealthCheckRequest(service=""), ctx), loop.loop
        )
        assert ctx.writing.wait(30)
        # the shutdown lands while SERVING is in flight; it returns once the stream ended
        done = threading.Thread(target=health.enter_graceful_shutdown, args=(30.0,))
        done.start()
        check = health_pb2.HealthCheckRequest(service="")
        deadline = time.monotonic() + 30
        while loop.call(health.Check(check, None)).status != NOT_SERVING:  # shutdown ran
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert ctx.release is not None
        loop.call_soon(ctx.release.set)
        watch.result(30)
        done.join(30)
        assert ctx.sent == [SERVING, NOT_SERVING]
    finally:
        loop.stop()
