"""gRPC statuses become typed exceptions: driven by a real gRPC server on a real socket.

Written for the async client; tools/unasync.py generates the same tests for the sync client.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

import cyberdesk
from cyberdesk import AsyncCyberdesk, CyberdeskError, NotFound, RateLimited, Unavailable
from cyberdesk_common.status import RpcError, resource_exhausted
from cyberdesk_proto.v1 import instance_pb2_grpc
from tests.support.procs import free_port


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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


@pytest.mark.anyio
async def test_not_found_carries_code_and_message(server: tuple[_Refusing, str]) -> None:
    servicer, target = server
    async with AsyncCyberdesk(api_key="cd_test", endpoint=target) as client:
        with pytest.raises(NotFound) as caught:
            await client.instances.get("i-1")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.message == "instance i-1 does not exist"
    assert servicer.metadata["authorization"] == "Bearer cd_test"


@pytest.mark.anyio
async def test_rate_limited_has_retry_after(server: tuple[_Refusing, str]) -> None:
    servicer, target = server
    servicer.error = resource_exhausted("rate limit of 10/1s exceeded", retry_after=1.25)
    async with AsyncCyberdesk(api_key="k", endpoint=target) as client:
        with pytest.raises(RateLimited) as caught:
            await client.instances.get("i-1")
    assert caught.value.retry_after == pytest.approx(1.25)
    assert isinstance(caught.value, CyberdeskError)


@pytest.mark.anyio
async def test_rate_limited_without_retry_info(server: tuple[_Refusing, str]) -> None:
    servicer, target = server
    servicer.error = resource_exhausted("quota of 5 instances reached")
    async with AsyncCyberdesk(api_key="k", endpoint=target) as client:
        with pytest.raises(RateLimited) as caught:
            await client.instances.get("i-1")
    assert caught.value.retry_after is None


@pytest.mark.anyio
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
async def test_each_code_its_class(
    server: tuple[_Refusing, str], code: grpc.StatusCode, cls: type[CyberdeskError]
) -> None:
    servicer, target = server
    servicer.error = RpcError(code, "why")
    async with AsyncCyberdesk(api_key="k", endpoint=target) as client:
        with pytest.raises(cls) as caught:
            await client.instances.get("i-1")
    assert caught.value.code is code
    assert str(caught.value) == f"{code.name}: why"


@pytest.mark.anyio
async def test_nobody_listening_is_unavailable() -> None:
    nobody = f"127.0.0.1:{free_port()}"
    async with AsyncCyberdesk(api_key="k", endpoint=nobody, timeout=5) as client:
        with pytest.raises(Unavailable):
            await client.instances.list()
