"""Per-instance token check: every call must carry `authorization: Bearer <token>`."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from cyberdesk_common.builtin_services import is_builtin_method
from cyberdesk_common.metadata import AUTHORIZATION_METADATA, bearer


def deny_handler(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same kind as `handler` that ends the call with `code` before reading input.

    The kind must match: a unary handler answering a streaming call would wait for a request
    message the client may never send.
    """

    async def unary(request: object, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        await context.abort(code, message)

    async def streaming(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:  # type: ignore[type-arg]
        await context.abort(code, message)
        yield None  # pragma: no cover - abort raises

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.stream_stream_rpc_method_handler(streaming)


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Rejects calls without the instance's token (constant-time compare); health stays open."""

    def __init__(self, token: str) -> None:
        self._expected = bearer(token).encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or is_builtin_method(handler_call_details.method):
            return handler
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTHORIZATION_METADATA:
                presented = value.encode() if isinstance(value, str) else value
                break
        if not presented:
            return deny_handler(
                handler, grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <instance token>' metadata"
            )
        if not hmac.compare_digest(presented, self._expected):
            return deny_handler(
                handler, grpc.StatusCode.UNAUTHENTICATED, "the instance token is not valid for this agent"
            )
        return handler
