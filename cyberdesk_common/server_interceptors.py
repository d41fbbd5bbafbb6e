"""The base of our server interceptors: wrap each method's handler once, keeping its shape.

Tracing (`tracing.TracingServerInterceptor`) and the access log with error mapping
(`grpc_server.CallInterceptor`) both replace a method's behaviour function by a wrapper; this
is the part they share: the four handler shapes, the (de)serializers carried over, the builtin
services (health, reflection) left alone, and one wrapper per method.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from cyberdesk_common.builtin_services import BUILTIN_METHOD_PREFIXES

Handler = Callable[..., Any]


class MethodWrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Calls `wrap(method, behaviour, streaming)` once per method and serves the wrapper."""

    def __init__(self, skip: Sequence[str] = BUILTIN_METHOD_PREFIXES) -> None:
        self._skip = tuple(skip)
        # method -> (handler, its wrapped handler). A server hands out the same handler object for
        # a method on every call, so the wrapper is built once per method, not once per call.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def wrap(self, method: str, fn: Handler, streaming: bool) -> Handler:
        """The behaviour that replaces `fn` (`streaming`: it returns an async iterator of responses)."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        if handler is None or method.startswith(self._skip):
            return handler
        rd, rs = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary:
            wrapped = grpc.unary_unary_rpc_method_handler(self.wrap(method, handler.unary_unary, False), rd, rs)
        elif handler.stream_unary:
            wrapped = grpc.stream_unary_rpc_method_handler(self.wrap(method, handler.stream_unary, False), rd, rs)
        elif handler.unary_stream:
            wrapped = grpc.unary_stream_rpc_method_handler(self.wrap(method, handler.unary_stream, True), rd, rs)
        else:
            wrapped = grpc.stream_stream_rpc_method_handler(self.wrap(method, handler.stream_stream, True), rd, rs)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
