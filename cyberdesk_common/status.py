"""Helpers to end a gRPC call with a precise status and, where useful, rich details.

Handlers raise `RpcError` (or call `abort`) instead of letting an exception escape: the server
interceptor turns an unexpected exception into INTERNAL without leaking a stack trace.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class RpcError(Exception):
    """An expected failure carrying the gRPC status code and a message meant for a person."""

    def __init__(self, code: grpc.StatusCode, message: str, details: list[any_pb2.Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or []

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """Trailers carrying a google.rpc.Status with the details, when there are any."""
        if not self.details:
            return ()
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=self.details)
        return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def invalid_argument(message: str) -> RpcError:
    """INVALID_ARGUMENT with a message naming the bad field."""
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> RpcError:
    """NOT_FOUND."""
    return RpcError(grpc.StatusCode.NOT_FOUND, message)


def failed_precondition(message: str) -> RpcError:
    """FAILED_PRECONDITION: the request is valid but the state does not allow it."""
    return RpcError(grpc.StatusCode.FAILED_PRECONDITION, message)


def resource_exhausted(message: str, retry_after: float | None = None) -> RpcError:
    """RESOURCE_EXHAUSTED, with a google.rpc.RetryInfo when a retry delay is known."""
    details: list[any_pb2.Any] = []
    if retry_after is not None:
        info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration())
        info.retry_delay.FromNanoseconds(int(retry_after * 1e9))
        packed = any_pb2.Any()
        packed.Pack(info)
        details.append(packed)
    return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, details)


def status_from_code(code: grpc.StatusCode) -> int:
    """The google.rpc.Code number of a grpc.StatusCode."""
    return int(code.value[0])


def decode_details(trailing: tuple[tuple[str, str | bytes], ...] | None) -> status_pb2.Status | None:
    """The google.rpc.Status carried in trailers, if any."""
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


async def abort(context: grpc.aio.ServicerContext, error: RpcError) -> NoReturn:  # type: ignore[type-arg]
    """End the call with `error`'s status, message and details."""
    trailers = error.trailing_metadata()
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(error.code, error.message)
    raise AssertionError("unreachable")  # context.abort always raises


__all__ = [
    "STATUS_DETAILS_KEY",
    "RpcError",
    "abort",
    "code_pb2",
    "decode_details",
    "failed_precondition",
    "invalid_argument",
    "not_found",
    "resource_exhausted",
    "status_from_code",
]
