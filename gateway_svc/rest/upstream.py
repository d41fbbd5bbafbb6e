"""How a REST request reaches its RPC: the `Upstream` interface the app calls, and its gateway implementation.

`Upstream` (and `BidiStream`) is all the HTTP side knows of gRPC, so the app can be driven by an
in-process upstream in tests. `GatewayUpstream` implements it for the gateway: each call takes the
caller's credentials from the HTTP headers (`authorization: Bearer <key>` or `x-api-key: <key>`,
the same names as the gRPC metadata), runs `Admission.admit` (key, scope, rate limit, tenant,
binding) exactly as the gRPC proxy does, and calls the upstream with typed messages. No other HTTP
header travels upstream.

An upstream failure becomes an `RpcError` carrying the upstream's code, message and status
details (so a RetryInfo still turns into `Retry-After`); an unreachable agent's binding is
forgotten, as on the gRPC path.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from cyberdesk._client_stream import stream_unary_result
from cyberdesk_common.status import RpcError, decode_details
from gateway_svc.admission import Admission, Target
from gateway_svc.rest.http_bindings import HttpBinding

CREDENTIAL_HEADERS = ("authorization", "x-api-key")


class BidiStream(Protocol):
    """An open bidirectional call (`BidiCall` in the gateway)."""

    async def write(self, message: Message) -> None:
        """Send one request."""
        ...

    async def done_writing(self) -> None:
        """Half-close."""
        ...

    def responses(self) -> AsyncIterator[Message]:
        """The responses."""
        ...

    def cancel(self) -> None:
        """Cancel the call."""
        ...


class WrappedBidi:
    """A BidiStream passed through to `inner`; a wrapper (explaining, revocable) overrides `responses`."""

    def __init__(self, inner: BidiStream) -> None:
        self._call = inner

    async def write(self, message: Message) -> None:
        """Send one request."""
        await self._call.write(message)

    async def done_writing(self) -> None:
        """Half-close."""
        await self._call.done_writing()

    def responses(self) -> AsyncIterator[Message]:
        """The responses."""
        return self._call.responses()

    def cancel(self) -> None:
        """Cancel the call."""
        self._call.cancel()


# Response headers of an upstream stream that the REST face passes on (the rest are gRPC's own).
FORWARDED_METADATA_PREFIX = "cyberdesk-"


@dataclass(frozen=True)
class StreamHead:
    """An upstream stream's response headers, ahead of its first message.

    A server that sends its headers on their own says something by it: WatchInstances sends them
    once the watch is in place, with the cursor it starts after. The REST face starts its response
    on them, so an HTTP client knows its watch is live (and where) before the first change.
    """

    headers: Mapping[str, str]


class Upstream(Protocol):
    """Calls an RPC on behalf of an HTTP request; raises RpcError or grpc.RpcError on failure."""

    async def unary(self, binding: HttpBinding, request: Message, headers: Mapping[str, str]) -> Message:
        """One request, one response."""
        ...

    def server_stream(
        self, binding: HttpBinding, request: Message, headers: Mapping[str, str]
    ) -> AsyncIterator[Message | StreamHead]:
        """One request, a stream of responses, led by a StreamHead when the server sends `cyberdesk-` headers."""
        ...

    async def client_stream(
        self, binding: HttpBinding, requests: AsyncIterator[Message], headers: Mapping[str, str]
    ) -> Message:
        """A stream of requests (the first names the instance), one response."""
        ...

    async def open_bidi(self, binding: HttpBinding, instance_id: str, headers: Mapping[str, str]) -> BidiStream:
        """Admit the caller and open a bidirectional call; raises RpcError when not admitted."""
        ...


def credentials(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The credential headers of an HTTP request as metadata pairs (nothing else is used)."""
    return [(name, headers[name]) for name in CREDENTIAL_HEADERS if name in headers]


class BidiCall:
    """An open bidirectional call: write requests, iterate responses, cancel; errors as RpcError."""

    def __init__(self, admission: Admission, target: Target, call: Any) -> None:
        self._admission = admission
        self._target = target
        self._call = call

    async def write(self, message: Message) -> None:
        """Send one request (waits for flow control)."""
        try:
            await self._call.write(message)
        except grpc.aio.AioRpcError as err:
            raise _rpc_error(self._admission, self._target, err) from None
        except asyncio.InvalidStateError:
            # The upstream ended the call already: report how it ended.
            raise await self._ended() from None

    async def _ended(self) -> RpcError:
        code: grpc.StatusCode = await self._call.code()
        details: str = await self._call.details() or ""
        if code is grpc.StatusCode.CANCELLED:
            return RpcError(code, details or "the call was cancelled")
        return _status_error(self._admission, self._target, code, details, await self._call.trailing_metadata())

    async def done_writing(self) -> None:
        """No more requests (half-close)."""
        try:
            await self._call.done_writing()
        except grpc.aio.AioRpcError as err:
            raise _rpc_error(self._admission, self._target, err) from None

    async def responses(self) -> AsyncIterator[Message]:
        """The responses until the upstream ends the call."""
        try:
            async for message in self._call:
                yield message
        except grpc.aio.AioRpcError as err:
            raise _rpc_error(self._admission, self._target, err) from None

    def cancel(self) -> None:
        """Cancel the upstream call (no-op once it ended)."""
        self._call.cancel()


def _rpc_error(admission: Admission, target: Target, err: grpc.aio.AioRpcError) -> RpcError:
    return _status_error(admission, target, err.code(), err.details() or "", err.trailing_metadata())


def _status_error(admission: Admission, target: Target, code: grpc.StatusCode, details: str, trailers: Any) -> RpcError:
    code, message = admission.upstream_failed(target, code, details)
    status = decode_details(tuple(trailers) if trailers else None)
    return RpcError(code, message, list(status.details) if status is not None else [])


class GatewayUpstream:
    """`Upstream` over `Admission`: the REST face reaches instance_svc and agents like gRPC callers do."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    async def _target(self, binding: HttpBinding, first: Message, headers: Mapping[str, str]) -> Target:
        def instance_id() -> str:
            value = getattr(first, "instance_id", "")
            return value if isinstance(value, str) else ""

        return await self._admission.admit(binding.service, credentials(headers), instance_id, None)

    @staticmethod
    def _multi(binding: HttpBinding, target: Target, kind: str) -> Any:
        factory = getattr(target.channel, kind)
        return factory(binding.full_method, lambda m: m.SerializeToString(), binding.response_class().FromString)

    async def unary(self, binding: HttpBinding, request: Message, headers: Mapping[str, str]) -> Message:
        """One request, one response."""
        target = await self._target(binding, request, headers)
        call = self._multi(binding, target, "unary_unary")(request, metadata=target.metadata, timeout=target.timeout)
        try:
            response: Message = await call
            return response
        except grpc.aio.AioRpcError as err:
            raise _rpc_error(self._admission, target, err) from None
        finally:
            call.cancel()  # no-op when done; cancels upstream when the HTTP handler was cancelled

    async def server_stream(
        self, binding: HttpBinding, request: Message, headers: Mapping[str, str]
    ) -> AsyncIterator[Message | StreamHead]:
        """One request, a stream of responses; the upstream call is cancelled when the consumer stops."""
        target = await self._target(binding, request, headers)
        call = self._multi(binding, target, "unary_stream")(request, metadata=target.metadata, timeout=target.timeout)
        try:
            # Resolves with the first message, unless the server sent its headers on their own.
            forwarded = {
                str(key): str(value)
                for key, value in (await call.initial_metadata() or ())
                if str(key).startswith(FORWARDED_METADATA_PREFIX)
            }
            if forwarded:
                yield StreamHead(forwarded)
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as err:
            raise _rpc_error(self._admission, target, err) from None
        finally:
            call.cancel()

    async def client_stream(
        self, binding: HttpBinding, requests: AsyncIterator[Message], headers: Mapping[str, str]
    ) -> Message:
        """A stream of requests (the first names the instance), one response.

        The requests go to grpc.aio as an iterator: it writes each one and awaits its flow-control
        credit before pulling the next from `requests`, so a fast HTTP client cannot make the
        gateway queue its body; and when the upstream ends the call early (an upload refused after
        its header), the caller gets that status, not a failed write. When `requests` itself fails
        (a bad NDJSON line, the client went away) the call is cancelled, never half-closed, so the
        upstream cannot mistake a broken body for a complete one, and that failure is raised.
        """
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "the request stream is empty") from None
        target = await self._target(binding, first, headers)
        failure: list[BaseException] = []

        async def guarded() -> AsyncIterator[Message]:
            yield first
            try:
                async for message in requests:
                    yield message
            except (GeneratorExit, asyncio.CancelledError):
                # grpc.aio closing the iterator, or cancelling the task that drives it while it
                # waits for the body, because the call already ended (the agent refused the upload
                # after its header): the body did not fail, the call's status stands.
                raise
            except BaseException as exc:  # grpc.aio cancels the call when its iterator raises
                failure.append(exc)
                raise

        call = self._multi(binding, target, "stream_unary")(guarded(), metadata=target.metadata, timeout=target.timeout)
        try:
            response: Message = await stream_unary_result(call)
            return response
        except grpc.aio.AioRpcError as err:
            if failure:
                raise failure[0] from None
            raise _rpc_error(self._admission, target, err) from None
        except asyncio.CancelledError:
            if failure:
                raise failure[0] from None
            raise
        finally:
            call.cancel()

    async def open_bidi(self, binding: HttpBinding, instance_id: str, headers: Mapping[str, str]) -> BidiCall:
        """Admit the caller and open a bidirectional call to the agent of `instance_id` (nothing sent yet)."""
        probe = binding.new_request()
        if "instance_id" in probe.DESCRIPTOR.fields_by_name:
            setattr(probe, "instance_id", instance_id)  # noqa: B010 - a field of the request, by name
        target = await self._target(binding, probe, headers)
        call = self._multi(binding, target, "stream_stream")(metadata=target.metadata, timeout=target.timeout)
        return BidiCall(self._admission, target, call)
