"""Requests that do not decode are the caller's fault: INVALID_ARGUMENT, not INTERNAL.

gRPC Python answers a request its deserializer cannot parse (invalid UTF-8 in a ``string``
field, a truncated message) with INTERNAL "Exception deserializing request", which reads as a
server bug and hides the reason. This interceptor wraps the deserializer of every method that
takes one request message: a message that does not parse becomes a marker, and the wrapped
handler answers it INVALID_ARGUMENT with protobuf's reason (clipped) before any servicer runs.
Streaming-request methods (reflection) are left as they are. A ``grpc.aio`` interceptor: the
handlers it wraps are coroutines (unary answers, and streams that write with ``context.write``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from clustermap.rules import clip

__all__ = ["MalformedRequestInterceptor"]

log = logging.getLogger("clustermap.server.rpc")


class _Malformed:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        # method -> (its handler, that handler wrapped): wrapped once, not on every call (on
        # the loop only: no lock)
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        hit = self._wrapped.get(method)
        if hit is None or hit[0] is not handler:
            hit = self._wrapped[method] = (handler, _wrap(handler, method))
        return hit[1]


def _wrap(handler: Any, method: str) -> Any:
    """``handler`` with its deserializer and behaviour guarded against malformed requests."""
    decode = handler.request_deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return decode(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return _Malformed(str(exc) or type(exc).__name__)

    def guard(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: Any) -> Any:
            if isinstance(request, _Malformed):
                log.info(
                    "malformed request",
                    extra={
                        "event": "invalid",
                        "method": method,
                        "peer": context.peer(),
                    },
                )
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"malformed request: {clip(request.reason)[1:-1]}",
                )
            return await behavior(request, context)

        return call

    if handler.unary_unary is not None:
        return handler._replace(
            request_deserializer=deserialize, unary_unary=guard(handler.unary_unary)
        )
    return handler._replace(
        request_deserializer=deserialize, unary_stream=guard(handler.unary_stream)
    )
