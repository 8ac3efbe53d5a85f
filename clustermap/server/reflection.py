"""gRPC server reflection with a cap on concurrent streams.

A reflection stream is bidirectional and lasts as long as the client keeps it open. On the
``grpc.aio`` server it is a coroutine, not a worker thread, but an unbounded number of idle
``grpcurl``-style streams would still hold memory (issue 17), so reflection streams are capped
(``--max-reflection-streams``, default 2 — a client such as grpcio's descriptor database opens a
stream per lookup, and the last one may not be released yet when it opens the next; 0 turns
reflection off): one more is refused RESOURCE_EXHAUSTED at once. The count lives on the loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import grpc
from grpc_reflection.v1alpha import _async, reflection, reflection_pb2, reflection_pb2_grpc

__all__ = ["SERVICE_NAME", "CappedReflectionServicer", "enable_reflection"]

SERVICE_NAME = reflection.SERVICE_NAME


class CappedReflectionServicer(_async.ReflectionServicer):  # type: ignore[misc]
    def __init__(self, service_names: Iterable[str], max_streams: int) -> None:
        super().__init__(list(service_names))
        self._open = 0
        self._max = max_streams

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest], context: Any
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        if self._open >= self._max:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many reflection streams (--max-reflection-streams {self._max}); retry later",
            )
        self._open += 1
        try:
            async for response in super().ServerReflectionInfo(request_iterator, context):
                yield response
        finally:
            self._open -= 1


def enable_reflection(service_names: Iterable[str], server: Any, max_streams: int) -> None:
    """Serve reflection for ``service_names`` with at most ``max_streams`` streams (0: none)."""
    if max_streams > 0:
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            CappedReflectionServicer(service_names, max_streams), server
        )
