"""Typed exceptions of the SDK, one per gRPC status a caller can act on.

Every failed call raises a `CyberdeskError` subclass carrying the gRPC status code and the
server's message, so callers can `except NotFound:` instead of comparing status codes.
"""

from __future__ import annotations

from typing import Any

import grpc

_DETAILS_KEY = "grpc-status-details-bin"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


class CyberdeskError(Exception):
    """A call failed. `code` is the gRPC status code, `message` the server's explanation."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.code is not grpc.StatusCode.UNKNOWN else self.message


class ConfigurationError(CyberdeskError):
    """The client cannot be built: no API key, or an unusable endpoint or config file."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __str__(self) -> str:
        return self.message


class InvalidArgument(CyberdeskError):
    """The request is malformed; the message names the bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CyberdeskError):
    """The instance, snapshot, file or process does not exist (or belongs to another tenant)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CyberdeskError):
    """The target exists (a file uploaded without overwrite, a tag in use)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(CyberdeskError):
    """The API key is valid but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(CyberdeskError):
    """The API key is missing, unknown or revoked."""

    code = grpc.StatusCode.UNAUTHENTICATED


class RateLimited(CyberdeskError):
    """Too many requests or a quota is used up. `retry_after` (seconds) is set when the server knows."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, code: grpc.StatusCode | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after


class FailedPrecondition(CyberdeskError):
    """The request is valid but the state does not allow it (e.g. a paused instance, no desktop)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(CyberdeskError):
    """The service cannot be reached or is shutting down; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CyberdeskError):
    """The call did not finish within its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(CyberdeskError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class DataLoss(CyberdeskError):
    """Transferred bytes do not match their checksum."""

    code = grpc.StatusCode.DATA_LOSS


class InternalError(CyberdeskError):
    """The server failed unexpectedly."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[CyberdeskError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        Unauthenticated,
        RateLimited,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        DataLoss,
        InternalError,
    )
}


def _retry_after(trailers: Any) -> float | None:
    """The RetryInfo delay in a google.rpc.Status trailer, if the server sent one."""
    for item in trailers or ():
        key, value = item if isinstance(item, tuple) else (item.key, item.value)
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        # Imported here: decoding details is rare, and `import cyberdesk` must stay cheap.
        from google.rpc import error_details_pb2, status_pb2

        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.type_url == _RETRY_INFO:
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


def error_from_status(code: grpc.StatusCode, message: str, trailers: Any = None) -> CyberdeskError:
    """The typed exception for a gRPC status (and its trailers, for RetryInfo)."""
    if code is grpc.StatusCode.UNAVAILABLE and not message:
        message = "the Cyberdesk endpoint cannot be reached"
    cls = _BY_CODE.get(code, CyberdeskError)
    if cls is RateLimited:
        return RateLimited(message, code, retry_after=_retry_after(trailers))
    return cls(message, code)


def from_rpc_error(err: grpc.RpcError) -> CyberdeskError:
    """Translate a grpc error (sync or aio) into its typed exception."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return error_from_status(code or grpc.StatusCode.UNKNOWN, message or "", trailers)


__all__ = [
    "AlreadyExists",
    "Cancelled",
    "ConfigurationError",
    "CyberdeskError",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "Unauthenticated",
    "Unavailable",
    "error_from_status",
    "from_rpc_error",
]
