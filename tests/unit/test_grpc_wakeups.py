"""grpc.aio's completion reader, wrapped so that one loop pass takes every pending wake-up:
it is found on a real grpc.aio server's loop, wrapped once, and no completion is lost (a burst
of concurrent calls on one loop all finish; each call's completions went through it)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clustermap.server.health import HealthServicer
from clustermap.server.serving import LoopThread, coalesce_grpc_wakeups

CALLS = 300


def test_reader_is_wrapped_and_every_completion_still_arrives() -> None:
    loop = LoopThread(2)

    async def scenario() -> tuple[bool, bool, list[int]]:
        server = grpc.aio.server()
        health = HealthServicer(loop)
        health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            running = asyncio.get_running_loop()
            wrapped = coalesce_grpc_wakeups(running)
            again = coalesce_grpc_wakeups(running)  # already wrapped: left alone
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                answers = await asyncio.wait_for(
                    asyncio.gather(
                        *(stub.Check(health_pb2.HealthCheckRequest()) for _ in range(CALLS))
                    ),
                    120,
                )
            return wrapped, again, [a.status for a in answers]
        finally:
            await server.stop(None)

    try:
        wrapped, again, statuses = loop.call(scenario(), timeout=180)
    finally:
        loop.stop()
    assert wrapped, "grpc.aio's completion reader was not found on the loop"
    assert not again
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * CALLS
