"""A do-nothing gRPC proxy, the floor of what a gateway built on grpc.aio costs.

`python -m bench._bare_proxy LISTEN UPSTREAM` serves ProcessService's one-request methods.

Every call is forwarded as bytes to UPSTREAM with only its `authorization` header: no key check,
no rate limit, no routing, no tracing, no log, no interceptor. bench/gateway_proxy.py puts it
beside the real gateway in front of the same agent, to tell the cost of grpc.aio's two hops
(server and client) from the gateway's own work.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc

from cyberdesk_proto.v1 import process_pb2


def public_shapes() -> dict[str, bool]:
    """ProcessService's one-request methods by path -> whether they stream their responses."""
    service = process_pb2.DESCRIPTOR.services_by_name["ProcessService"]
    return {f"/{service.full_name}/{m.name}": m.server_streaming for m in service.methods if not m.client_streaming}


async def _serve(listen: str, upstream: str) -> None:
    channel = grpc.aio.insecure_channel(upstream)
    server = grpc.aio.server()
    handlers: dict[str, grpc.RpcMethodHandler] = {}  # type: ignore[type-arg]
    for path, streaming in public_shapes().items():
        if streaming:
            stream_call = channel.unary_stream(path, None, None)

            async def stream(
                request: bytes,
                context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
                call: grpc.aio.UnaryStreamMultiCallable = stream_call,  # type: ignore[type-arg]
            ) -> AsyncIterator[bytes]:
                async for message in call(request, metadata=_auth(context)):
                    yield message

            handlers[path] = grpc.unary_stream_rpc_method_handler(stream)
        else:
            unary_call = channel.unary_unary(path, None, None)

            async def unary(
                request: bytes,
                context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
                call: grpc.aio.UnaryUnaryMultiCallable = unary_call,  # type: ignore[type-arg]
            ) -> bytes:
                response: bytes = await call(request, metadata=_auth(context))
                return response

            handlers[path] = grpc.unary_unary_rpc_method_handler(unary)

    class _Generic(grpc.GenericRpcHandler):  # type: ignore[type-arg]
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
            return handlers.get(details.method)

    server.add_generic_rpc_handlers((_Generic(),))
    server.add_insecure_port(listen)
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


def _auth(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:  # type: ignore[type-arg]
    return tuple((k, v) for k, v in context.invocation_metadata() or () if k == "authorization")


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], sys.argv[2]))
