"""Bearer-token checks for the gRPC services, as a server interceptor.

Tokens travel in the ``authorization: Bearer <token>`` metadata. Which token a method needs:

* ``clustermap.v1.Registry/*`` (writes, including operators' overrides): the admin token. When
  only a subscribe token is configured, writes are closed to everyone (PERMISSION_DENIED): a
  server with any token never takes anonymous writes;
* ``clustermap.v1.Subscription/*`` and ``clustermap.v1.Inspection/*`` (reads): the subscribe
  token, and the admin token is accepted too; with no subscribe token configured, reads need the
  admin token when one is configured;
* health checking and reflection: never (load balancers and tools must reach them).

Missing or unknown token → UNAUTHENTICATED; a valid token without the right (the subscribe token
on a registry call) → PERMISSION_DENIED. Every refusal is logged with the peer and method; the
call never reaches a servicer, so nothing changes. A ``grpc.aio`` interceptor: it runs on the
server's event loop and does no I/O.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

__all__ = ["TokenInterceptor"]

log = logging.getLogger("clustermap.server.auth")

_ADMIN_PREFIX = "/clustermap.v1.Registry/"
_READ_PREFIXES = ("/clustermap.v1.Subscription/", "/clustermap.v1.Inspection/")


def _same(a: str, b: str | None) -> bool:
    return b is not None and hmac.compare_digest(a.encode(), b.encode())


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        admin_token: str | None,
        subscribe_token: str | None,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self._on_refused = on_refused
        self._admin = admin_token or None
        self._subscribe = subscribe_token or None

    @property
    def enabled(self) -> bool:
        return self._admin is not None or self._subscribe is not None

    def _check(self, method: str, token: str | None) -> tuple[grpc.StatusCode, str] | None:
        if method.startswith(_ADMIN_PREFIX):
            if self._admin is None:
                if self._subscribe is None:
                    return None
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "no admin token is configured: writes are closed",
                )
            if token is None:
                return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"
            if _same(token, self._admin):
                return None
            if _same(token, self._subscribe):
                return grpc.StatusCode.PERMISSION_DENIED, "this token may not change the registry"
            return grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
        if method.startswith(_READ_PREFIXES):
            required = self._subscribe or self._admin
            if required is None:
                return None
            if token is None:
                return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"
            if _same(token, self._subscribe) or _same(token, self._admin):
                return None
            return grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
        return None

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        method: str = handler_call_details.method
        token = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, rest = value.partition(" ")
                token = rest.strip() if scheme.lower() == "bearer" else ""
        refusal = self._check(method, token)
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        code, message = refusal

        async def deny(request: Any, context: Any) -> Any:
            if self._on_refused is not None:
                self._on_refused()
            log.warning(
                "request refused",
                extra={
                    "event": "auth_refused",
                    "method": method,
                    "peer": context.peer(),
                    "code": code.name,
                    "reason": message,
                },
            )
            await context.abort(code, message)

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                deny, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                deny, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                deny, handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            deny, handler.request_deserializer, handler.response_serializer
        )
