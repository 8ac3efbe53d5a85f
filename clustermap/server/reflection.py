"""gRPC server reflection with a cap on concurrent streams.

A reflection stream is bidirectional and holds a gRPC worker thread for as long as the client
keeps it open, so eight idle ``grpcurl``-style streams used to take every worker and starve
Register and Poll (issue 17). Like Watch streams, reflection streams are capped
(``--max-reflection-streams``, default 2 — a client such as grpcio's descriptor database
opens a stream per lookup, and the last one may not be released yet when it opens the next;
0 turns reflection off): one more is refused
RESOURCE_EXHAUSTED at once, and the cap is counted into the workers that Watch and reflection
together may hold, so unary calls always find a free worker.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

__all__ = ["SERVICE_NAME", "CappedReflectionServicer", "enable_reflection"]

SERVICE_NAME = reflection.SERVICE_NAME


class CappedReflectionServicer(reflection.ReflectionServicer):  # type: ignore[misc]
    def __init__(self, service_names: Iterable[str], max_streams: int) -> None:
        super().__init__(list(service_names))
        self._slots = threading.BoundedSemaphore(max_streams)
        self._max = max_streams

    def ServerReflectionInfo(
        self, request_iterator: Iterator[reflection_pb2.ServerReflectionRequest], context: Any
    ) -> Iterator[reflection_pb2.ServerReflectionResponse]:
        if not self._slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many reflection streams (--max-reflection-streams {self._max}); retry later",
            )
        try:
            yield from super().ServerReflectionInfo(request_iterator, context)
        finally:
            self._slots.release()


def enable_reflection(service_names: Iterable[str], server: Any, max_streams: int) -> None:
    """Serve reflection for ``service_names`` with at most ``max_streams`` streams (0: none)."""
    if max_streams > 0:
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            CappedReflectionServicer(service_names, max_streams), server
        )
