"""Bearer-token authentication for gRPC calls, as a server interceptor.

Clients send ``authorization: Bearer TOKEN`` metadata (the form gRPC's own call
credentials use). A call without it, or with another token, ends with UNAUTHENTICATED
before its request is even deserialised. Health checking and reflection stay open, so
load balancers and grpcurl-style tools work without the token.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc

if TYPE_CHECKING:  # the stubs make it generic; the runtime class is not
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]

OPEN_PREFIXES: Final = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer ...`` entry, or None."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class TokenAuth(grpc.aio.ServerInterceptor):
    """Reject calls whose bearer token is not ``token`` (health and reflection excepted)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method: str = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and hmac.compare_digest(token.encode(), self._token):
            return await continuation(handler_call_details)
        message = (
            "missing 'authorization: Bearer TOKEN' metadata"
            if token is None
            else "invalid bearer token"
        )
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: UNIMPLEMENTED, as without auth
            return handler
        return _deny(handler, message)


def _deny(handler: Handler, message: str) -> Handler:
    """A handler of the same shape that answers UNAUTHENTICATED without parsing the request."""

    async def unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(unary)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(unary)
    return grpc.unary_unary_rpc_method_handler(unary)
