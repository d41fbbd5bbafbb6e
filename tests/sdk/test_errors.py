"""gRPC statuses become typed exceptions: driven by a real gRPC server on a real socket."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

import cyberdesk
from cyberdesk import Cyberdesk, CyberdeskError, NotFound, RateLimited, Unavailable
from cyberdesk._errors import error_from_status
from cyberdesk_common.status import RpcError, resource_exhausted
from cyberdesk_proto.v1 import instance_pb2_grpc
from tests.support.procs import free_port


class _Refusing(instance_pb2_grpc.InstanceServiceServicer):
    """Answers every call with the status the test chose, the way our servers do (trailers with details)."""

    def __init__(self) -> None:
        self.error: RpcError = RpcError(grpc.StatusCode.NOT_FOUND, "instance i-1 does not exist")
        self.metadata: dict[str, str] = {}

    def GetInstance(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.metadata = {k: str(v) for k, v in context.invocation_metadata()}
        if self.error.details:
            context.set_trailing_metadata(self.error.trailing_metadata())
        context.abort(self.error.code, self.error.message)


@pytest.fixture
def server() -> Iterator[tuple[_Refusing, str]]:
    servicer = _Refusing()
    srv = grpc.server(futures.ThreadPoolExecutor(2))
    instance_pb2_grpc.add_InstanceServiceServicer_to_server(servicer, srv)
    target = f"127.0.0.1:{free_port()}"
    srv.add_insecure_port(target)
    srv.start()
    yield servicer, target
    srv.stop(None)


def test_not_found_carries_code_and_message(server: tuple[_Refusing, str]) -> None:
    servicer, target = server
    with Cyberdesk(api_key="cd_test", endpoint=target) as client, pytest.raises(NotFound) as caught:
        client.instances.get("i-1")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.message == "instance i-1 does not exist"
    assert servicer.metadata["authorization"] == "Bearer cd_test"


def test_rate_limited_has_retry_after(server: tuple[_Refusing, str]) -> None:
    servicer, target = server
    servicer.error = resource_exhausted("rate limit of 10/1s exceeded", retry_after=1.25)
    with Cyberdesk(api_key="k", endpoint=target) as client, pytest.raises(RateLimited) as caught:
        client.instances.get("i-1")
    assert caught.value.retry_after == pytest.approx(1.25)
    assert isinstance(caught.value, CyberdeskError)


def test_rate_limited_without_retry_info(server: tuple[_Refusing, str]) -> None:
    servicer, target = server
    servicer.error = resource_exhausted("quota of 5 instances reached")
    with Cyberdesk(api_key="k", endpoint=target) as client, pytest.raises(RateLimited) as caught:
        client.instances.get("i-1")
    assert caught.value.retry_after is None


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, cyberdesk.InvalidArgument),
        (grpc.StatusCode.PERMISSION_DENIED, cyberdesk.PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, cyberdesk.Unauthenticated),
        (grpc.StatusCode.FAILED_PRECONDITION, cyberdesk.FailedPrecondition),
        (grpc.StatusCode.ALREADY_EXISTS, cyberdesk.AlreadyExists),
        (grpc.StatusCode.INTERNAL, cyberdesk.InternalError),
    ],
)
def test_each_code_its_class(server: tuple[_Refusing, str], code: grpc.StatusCode, cls: type[CyberdeskError]) -> None:
    servicer, target = server
    servicer.error = RpcError(code, "why")
    with Cyberdesk(api_key="k", endpoint=target) as client, pytest.raises(cls) as caught:
        client.instances.get("i-1")
    assert caught.value.code is code
    assert str(caught.value) == f"{code.name}: why"


def test_nobody_listening_is_unavailable() -> None:
    with Cyberdesk(api_key="k", endpoint=f"127.0.0.1:{free_port()}", timeout=5) as client, pytest.raises(Unavailable):
        client.instances.list()


def test_unmapped_code_is_base_class() -> None:
    err = error_from_status(grpc.StatusCode.ABORTED, "conflict")
    assert type(err) is CyberdeskError and err.code is grpc.StatusCode.ABORTED


def test_async_client_maps_errors(server: tuple[_Refusing, str]) -> None:
    servicer, target = server
    servicer.error = resource_exhausted("slow down", retry_after=2)

    async def call() -> RateLimited:
        async with cyberdesk.AsyncCyberdesk(api_key="cd_async", endpoint=target) as client:
            with pytest.raises(RateLimited) as caught:
                await client.instances.get("i-1")
        return caught.value

    err = asyncio.run(call())
    assert err.retry_after == pytest.approx(2.0)
    assert servicer.metadata["authorization"] == "Bearer cd_async"
