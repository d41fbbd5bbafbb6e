"""gRPC status -> HTTP status, and the `google.rpc.Status`-shaped JSON error body.

The mapping is the canonical one of google/rpc/code.proto (the one grpc-gateway and Google's APIs
use). The body is `{"code": <google.rpc.Code number>, "message": str, "details": [Any as JSON]}`,
so a REST client sees the same code and message as a gRPC client would.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.rpc import error_details_pb2, status_pb2

from cyberdesk_common.status import RpcError, decode_details

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

_BY_NUMBER: dict[int, grpc.StatusCode] = {int(c.value[0]): c for c in grpc.StatusCode}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status of a gRPC status code."""
    return HTTP_STATUS.get(code, 500)


def code_from_number(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Code number (UNKNOWN for a number that is none)."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def _any_to_json(detail: any_pb2.Any) -> dict[str, Any]:
    try:
        out: dict[str, Any] = json_format.MessageToDict(detail)
        return out
    except (TypeError, KeyError, json_format.Error):
        # A detail whose type this process does not know still reaches the client, undecoded.
        return {"@type": detail.type_url, "value": base64.b64encode(detail.value).decode("ascii")}


def status_body(code: grpc.StatusCode, message: str, details: Sequence[any_pb2.Any] = ()) -> dict[str, Any]:
    """The google.rpc.Status JSON form: {code, message, details}."""
    return {"code": int(code.value[0]), "message": message, "details": [_any_to_json(d) for d in details]}


@dataclass(frozen=True)
class HttpError:
    """An error ready to send: HTTP status, extra headers and the JSON body."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def body_bytes(self) -> bytes:
        """The body as compact UTF-8 JSON."""
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _retry_after(details: Sequence[any_pb2.Any]) -> dict[str, str]:
    for d in details:
        if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            d.Unpack(info)
            seconds = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            # Retry-After is whole seconds; round up so a client never retries too early.
            return {"Retry-After": str(max(0, math.ceil(seconds)))}
    return {}


def _disk_full(details: Sequence[any_pb2.Any]) -> bool:
    for d in details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            if info.reason == "DISK_FULL":
                return True
    return False


def from_status(code: grpc.StatusCode, message: str, details: Sequence[any_pb2.Any] = ()) -> HttpError:
    """An HttpError for a gRPC status; RESOURCE_EXHAUSTED with a RetryInfo gets a Retry-After header.

    RESOURCE_EXHAUSTED with the agent's ErrorInfo DISK_FULL is 507 Insufficient Storage, not 429:
    a client that waits and retries, as 429 tells it to, would only fill the same disk again.
    """
    headers = _retry_after(details) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else {}
    if code == grpc.StatusCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    status = http_status(code)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _disk_full(details):
        status = 507
    return HttpError(status, status_body(code, message, details), headers)


def from_rpc_error(error: RpcError) -> HttpError:
    """An HttpError for a cyberdesk_common RpcError (raised by the gateway itself or by the mapping)."""
    return from_status(error.code, error.message, error.details)


def from_grpc_error(error: grpc.RpcError) -> HttpError:
    """An HttpError for the status an upstream gRPC call ended with (details read from its trailers)."""
    code: grpc.StatusCode = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message: str = (error.details() if hasattr(error, "details") else "") or ""
    trailing: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    status: status_pb2.Status | None = decode_details(tuple(trailing) if trailing else None)
    return from_status(code, message, list(status.details) if status is not None else [])


def route_not_found(method: str, path: str) -> HttpError:
    """404 for a path no binding matches."""
    return from_status(grpc.StatusCode.NOT_FOUND, f"no route for {method} {path}")


def method_not_allowed(method: str, path: str, allowed: Sequence[str]) -> HttpError:
    """405 for a path that has bindings, but not for this method; Allow lists the methods that do."""
    err = from_status(
        grpc.StatusCode.UNIMPLEMENTED, f"{method} is not allowed on {path}; allowed: {', '.join(allowed)}"
    )
    return HttpError(405, err.body, {"Allow": ", ".join(allowed)})
