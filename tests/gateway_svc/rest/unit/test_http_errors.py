"""The canonical gRPC -> HTTP status mapping and the google.rpc.Status JSON body."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from cyberdesk_common.status import STATUS_DETAILS_KEY, RpcError, invalid_argument, resource_exhausted
from gateway_svc.rest import http_errors as errors

CANONICAL = [
    (grpc.StatusCode.OK, 200),
    (grpc.StatusCode.CANCELLED, 499),
    (grpc.StatusCode.UNKNOWN, 500),
    (grpc.StatusCode.INVALID_ARGUMENT, 400),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.ALREADY_EXISTS, 409),
    (grpc.StatusCode.PERMISSION_DENIED, 403),
    (grpc.StatusCode.UNAUTHENTICATED, 401),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (grpc.StatusCode.FAILED_PRECONDITION, 400),
    (grpc.StatusCode.ABORTED, 409),
    (grpc.StatusCode.OUT_OF_RANGE, 400),
    (grpc.StatusCode.UNIMPLEMENTED, 501),
    (grpc.StatusCode.INTERNAL, 500),
    (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DATA_LOSS, 500),
]


@pytest.mark.parametrize(("code", "status"), CANONICAL)
def test_canonical_mapping(code: grpc.StatusCode, status: int) -> None:
    assert errors.http_status(code) == status
    assert errors.code_from_number(code.value[0]) == code


def test_every_grpc_code_is_mapped() -> None:
    assert {c for c, _ in CANONICAL} == set(grpc.StatusCode)
    assert errors.code_from_number(999) == grpc.StatusCode.UNKNOWN


def test_body_has_the_status_shape() -> None:
    err = errors.from_rpc_error(invalid_argument("page_size: -1 is negative"))
    assert err.status == 400 and err.headers == {}
    body = json.loads(err.body_bytes())
    assert body == {"code": 3, "message": "page_size: -1 is negative", "details": []}


def test_resource_exhausted_carries_retry_info_and_retry_after() -> None:
    err = errors.from_rpc_error(resource_exhausted("rate limit of key k: 10 requests/s", retry_after=1.2))
    assert err.status == 429
    assert err.headers == {"Retry-After": "2"}
    (detail,) = err.body["details"]
    assert detail == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.200s"}


def test_unauthenticated_asks_for_a_bearer() -> None:
    err = errors.from_status(grpc.StatusCode.UNAUTHENTICATED, "missing API key")
    assert (err.status, err.headers["WWW-Authenticate"]) == (401, "Bearer")


def test_unknown_detail_type_is_passed_through_undecoded() -> None:
    detail = any_pb2.Any(type_url="type.googleapis.com/some.Unknown", value=b"\x01\x02")
    body = errors.status_body(grpc.StatusCode.INTERNAL, "boom", [detail])
    assert body["details"] == [{"@type": "type.googleapis.com/some.Unknown", "value": "AQI="}]


class _UpstreamError(grpc.RpcError):
    """The interface of grpc.aio.AioRpcError / grpc.Call that the mapping reads."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, bytes], ...]) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailing


def test_from_upstream_grpc_error_with_details_in_trailers() -> None:
    info = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field="vcpus", description="at most 8")]
    )
    packed = any_pb2.Any()
    packed.Pack(info)
    status = status_pb2.Status(code=3, message="vcpus: at most 8", details=[packed])
    upstream = _UpstreamError(
        grpc.StatusCode.INVALID_ARGUMENT, "vcpus: at most 8", ((STATUS_DETAILS_KEY, status.SerializeToString()),)
    )
    err = errors.from_grpc_error(upstream)
    assert err.status == 400
    assert err.body["message"] == "vcpus: at most 8"
    assert err.body["details"][0]["fieldViolations"] == [{"field": "vcpus", "description": "at most 8"}]


def test_route_errors() -> None:
    nf = errors.route_not_found("GET", "/v2/x")
    assert nf.status == 404 and nf.body["code"] == 5 and "/v2/x" in nf.body["message"]
    na = errors.method_not_allowed("PATCH", "/v1/instances/i", ["DELETE", "GET"])
    assert na.status == 405 and na.headers == {"Allow": "DELETE, GET"} and na.body["code"] == 12


def test_rpc_error_code_round_trip() -> None:
    err = errors.from_rpc_error(RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "agent took too long"))
    assert (err.status, err.body["code"]) == (504, 4)
