"""The proxy: every public `cyberdesk.v1` method, forwarded as raw bytes to instance_svc, billing_svc or an agent.

Handlers are registered as one generic handler with identity (de)serializers: request and
response messages stay `bytes` end to end. Only field 1 (`instance_id`) of the first request
message is read, to route the call (see routing.read_instance_id).

Flow and lifetime rules:
- One message at a time: each message is awaited on one side before the next is read from the
  other, so a slow reader makes gRPC flow control push back on the writer; the gateway holds at
  most one message per direction per call, never a queue.
- The upstream call gets the caller's remaining time as its deadline; when the caller cancels,
  the handler task is cancelled and the `finally` cancels the upstream call; an upstream error
  reaches the caller with the same code, details and trailers (status details included).
- A caller that dies between messages is not always a cancel here: grpc.aio ends the request
  iterator normally when the connection drops (kill -9 of a client process: the kernel's FIN,
  no END_STREAM) and cancels the handler only a moment later, so relaying that end would
  half-close the upstream call as if the caller had finished. For a method whose last request
  must carry an end marker (UploadFile's trailer, `_END_FIELDS`), a request stream that ends
  without it cancels the upstream call instead (the agent discards or keeps the partial upload,
  and never commits it) and the caller, if still there, gets ABORTED.
- Metadata: the caller's API key and any `x-cyberdesk-*` header are stripped (a caller must not
  be able to claim a tenant); instance_svc gets the verified tenant and the internal token, an
  agent gets its own bearer token; `traceparent` is replaced by the gateway's span.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from cyberdesk._client_stream import stream_unary_result
from cyberdesk_common.status import invalid_argument
from cyberdesk_proto.v1 import billing_pb2, desktop_pb2, filesystem_pb2, instance_pb2, process_pb2
from gateway_svc.admission import AGENT_SERVICES, INSTANCE_SERVICE, Admission, Target, forwardable
from gateway_svc.routing import WireError, explain_lost, read_instance_id, top_level_fields

__all__ = ["AGENT_SERVICES", "INSTANCE_SERVICE", "MethodInfo", "Proxy", "forwardable", "public_methods"]

_FILES = (instance_pb2, process_pb2, filesystem_pb2, desktop_pb2, billing_pb2)
# Upstream codes of a call lost under the caller (the agent's connection dropped, its channel closed).
_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

# Client-streaming methods -> the field number their last request must carry (see the module rules).
_END_FIELDS: dict[str, int] = {
    "/cyberdesk.v1.FilesystemService/UploadFile": filesystem_pb2.UploadFileRequest.DESCRIPTOR.fields_by_name[
        "trailer"
    ].number,
}
UNFINISHED = "the upload ended before its trailer (size and sha256); nothing was committed"


@dataclass(frozen=True)
class MethodInfo:
    """A public method: its full path, service and streaming shape."""

    path: str
    service: str
    client_streaming: bool
    server_streaming: bool


def public_methods() -> dict[str, MethodInfo]:
    """Every method of the public services, keyed by its path ("/pkg.Service/Method"), from the descriptors."""
    methods: dict[str, MethodInfo] = {}
    for module in _FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                methods[path] = MethodInfo(path, service.full_name, method.client_streaming, method.server_streaming)
    return methods


def public_service_names() -> list[str]:
    """Full names of the public services (for health and reflection)."""
    return sorted({info.service for info in public_methods().values()})


class Proxy(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Generic handler serving every public method by forwarding it upstream."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._methods = public_methods()
        self._handlers = {path: self._handler(info) for path, info in self._methods.items()}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
        """The forwarding handler of a public method; None (UNIMPLEMENTED) for any other path."""
        return self._handlers.get(handler_call_details.method)

    # -- routing -----------------------------------------------------------------------------

    async def _upstream(self, info: MethodInfo, context: grpc.aio.ServicerContext, first: bytes) -> Target:  # type: ignore[type-arg]
        incoming: tuple[tuple[str, str | bytes], ...] = tuple(context.invocation_metadata() or ())

        def instance_id() -> str:
            try:
                return read_instance_id(first)
            except WireError as err:
                raise invalid_argument(f"the request is not a valid protobuf message: {err}") from None

        return await self._admission.admit(
            info.service, incoming, instance_id, context.time_remaining(), forward=forwardable(incoming)
        )

    async def _fail(self, context: grpc.aio.ServicerContext, up: Target, err: grpc.aio.AioRpcError) -> None:  # type: ignore[type-arg]
        """End the call with the upstream's status, details and trailers."""
        code, details = self._admission.upstream_failed(up, err.code(), err.details() or "")
        if err.code() in _LOST and not context.cancelled():
            # Lost mid-call: say what happened to the instance (deleted, failed...), if that is why.
            code, details = await explain_lost(self._admission.routes, up.instance_id, code, details)
        trailers = err.trailing_metadata()
        if trailers:
            context.set_trailing_metadata(tuple(trailers))  # type: ignore[arg-type]
        await context.abort(code, details)

    # -- the four shapes -------------------------------------------------------------------------

    def _handler(self, info: MethodInfo) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        path = info.path

        async def unary_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
            up = await self._upstream(info, context, request)
            call = up.channel.unary_unary(path, None, None)(request, metadata=up.metadata, timeout=up.timeout)
            try:
                response: bytes = await call
            except grpc.aio.AioRpcError as err:
                await self._fail(context, up, err)
                raise
            finally:
                call.cancel()  # no-op when done; cancels upstream when the caller went away
            _copy_trailers(context, await call.trailing_metadata())
            return response

        async def unary_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:  # type: ignore[type-arg]
            up = await self._upstream(info, context, request)
            call = up.channel.unary_stream(path, None, None)(request, metadata=up.metadata, timeout=up.timeout)
            try:
                async for message in _relay(call, context):
                    yield message
            except grpc.aio.AioRpcError as err:
                await self._fail(context, up, err)
            finally:
                call.cancel()

        async def stream_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
            first = await _first(requests)
            up = await self._upstream(info, context, first)
            relay = _Requests(first, requests, _END_FIELDS.get(path))
            call = up.channel.stream_unary(path, None, None)(relay.messages(), metadata=up.metadata, timeout=up.timeout)
            try:
                response: bytes = await stream_unary_result(call)
            except grpc.aio.AioRpcError as err:
                if relay.unfinished:
                    await _abort_unfinished(context)
                await self._fail(context, up, err)
                raise
            except asyncio.CancelledError:
                # grpc.aio reports the call it cancelled itself (our iterator raised) this way.
                if relay.unfinished:
                    await _abort_unfinished(context)
                raise
            finally:
                call.cancel()
            _copy_trailers(context, await call.trailing_metadata())
            return response

        async def stream_stream(
            requests: AsyncIterator[bytes],
            context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
        ) -> AsyncIterator[bytes]:
            first = await _first(requests)
            up = await self._upstream(info, context, first)
            call = up.channel.stream_stream(path, None, None)(
                _chain(first, requests), metadata=up.metadata, timeout=up.timeout
            )
            try:
                async for message in _relay(call, context):
                    yield message
            except grpc.aio.AioRpcError as err:
                await self._fail(context, up, err)
            finally:
                call.cancel()

        if info.client_streaming and info.server_streaming:
            return grpc.stream_stream_rpc_method_handler(stream_stream)
        if info.client_streaming:
            return grpc.stream_unary_rpc_method_handler(stream_unary)
        if info.server_streaming:
            return grpc.unary_stream_rpc_method_handler(unary_stream)
        return grpc.unary_unary_rpc_method_handler(unary_unary)


async def _first(requests: AsyncIterator[bytes]) -> bytes:
    try:
        return await anext(requests)
    except StopAsyncIteration:
        raise invalid_argument("the stream ended before its first message (which names the instance)") from None


async def _abort_unfinished(context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
    """ABORTED for the caller whose upload stream ended without its trailer, if it is still there."""
    try:
        await context.abort(grpc.StatusCode.ABORTED, UNFINISHED)
    except grpc.aio.AbortError:
        raise
    except Exception:
        # The caller is gone (the usual reason its stream ended early): nobody to tell, nothing
        # to log as a failure of ours.
        raise asyncio.CancelledError() from None


class _Unfinished(Exception):
    """The caller's request stream ended without its end marker (raised into grpc.aio: it cancels the call)."""


class _Requests:
    """The caller's requests relayed upstream; with `end_field`, ended only by a message carrying it."""

    def __init__(self, first: bytes, rest: AsyncIterator[bytes], end_field: int | None) -> None:
        self._first = first
        self._rest = rest
        self._end_field = end_field
        self.unfinished = False

    async def messages(self) -> AsyncIterator[bytes]:
        """`first`, then the rest; raises _Unfinished at the end when the last lacked the end field."""
        ended = False
        async for message in _chain(self._first, self._rest):
            yield message
            if self._end_field is not None:
                ended = _carries_field(message, self._end_field)
        if self._end_field is not None and not ended:
            self.unfinished = True
            raise _Unfinished()


def _carries_field(data: bytes, number: int) -> bool:
    """Whether the serialized message `data` has a top-level field `number` (tags read, payloads skipped).

    A malformed message says False: the call is then cancelled rather than ended, the safe side.
    """
    try:
        return any(field == number for field, _ in top_level_fields(data))
    except WireError:
        return False


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    # grpc.aio writes each item upstream and awaits the write before pulling the next, so this
    # generator never runs ahead of the upstream's flow-control window.
    yield first
    async for message in rest:
        yield message


async def _relay(call: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:  # type: ignore[type-arg]
    """The upstream's responses, one at a time; then its trailers onto the caller's call."""
    initial = await call.initial_metadata()
    if initial:
        await context.send_initial_metadata(tuple(forwardable(initial)))
    async for message in call:
        yield message
    _copy_trailers(context, await call.trailing_metadata())


def _copy_trailers(context: grpc.aio.ServicerContext, trailers: Any) -> None:  # type: ignore[type-arg]
    if trailers:
        context.set_trailing_metadata(tuple(trailers))
