# ruff: noqa: ASYNC230, ASYNC240  (a test stand-in: small local-disk I/O on the loop is fine here)
"""Real gRPC upstreams for the gateway tests, run as processes: `python -m tests.gateway_svc.upstream <role>`.

Until instance_svc and the guest agent's public services land, these stand in for them with real
behaviour on real sockets:

- `instance`: RoutingService.ResolveInstance and InstanceService.GetInstance over a routes file
  (JSON: {instance_id: {tenant, state, target, token}}), re-read on every call so a test can
  change an instance's state. It trusts `x-cyberdesk-tenant` only with the internal token, like
  instance_svc, and answers another tenant's instance with NOT_FOUND. GetInstance returns the
  `traceparent` it received in the `x-seen-traceparent` trailer.
- `agent`: behind the real agent token check (guest_agent.auth): ProcessService.StartProcess runs
  the command for real (bash -c), ConnectPty echoes keystrokes, FilesystemService.UploadFile and
  DownloadFile write and read real files. A cancelled StartProcess writes `<marker dir>/cancelled`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc

from cyberdesk.internal.v1 import routing_pb2, routing_pb2_grpc
from cyberdesk.v1 import (
    filesystem_pb2,
    filesystem_pb2_grpc,
    instance_pb2,
    instance_pb2_grpc,
    process_pb2,
    process_pb2_grpc,
)
from cyberdesk_common.grpc_server import ServerSpec, serve
from cyberdesk_common.log import setup_logging
from cyberdesk_common.status import RpcError, not_found
from guest_agent.auth import TokenInterceptor

STATES = {name.removeprefix("INSTANCE_STATE_"): value for name, value in instance_pb2.InstanceState.items()}


def _meta(context: grpc.aio.ServicerContext, key: str) -> str:  # type: ignore[type-arg]
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


class _Routes:
    def __init__(self, path: Path, token: str) -> None:
        self.path, self.token = path, token

    def lookup(self, context: grpc.aio.ServicerContext, tenant: str, instance_id: str) -> dict[str, str]:  # type: ignore[type-arg]
        if _meta(context, "x-cyberdesk-internal-token") != self.token:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "internal token missing or wrong")
        routes = json.loads(self.path.read_text())
        entry = routes.get(instance_id)
        if entry is None or entry["tenant"] != tenant:
            raise not_found(f"instance {instance_id} not found")
        return dict(entry)


class Routing(routing_pb2_grpc.RoutingServiceServicer):
    def __init__(self, routes: _Routes) -> None:
        self.routes = routes

    async def ResolveInstance(
        self, request: routing_pb2.ResolveInstanceRequest, context: grpc.aio.ServicerContext
    ) -> routing_pb2.ResolveInstanceResponse:  # type: ignore[type-arg]
        entry = self.routes.lookup(context, request.tenant_id, request.instance_id)
        return routing_pb2.ResolveInstanceResponse(
            state=STATES[entry["state"]], agent_target=entry["target"], agent_token=entry["token"]
        )


class Instances(instance_pb2_grpc.InstanceServiceServicer):
    def __init__(self, routes: _Routes) -> None:
        self.routes = routes

    async def GetInstance(
        self, request: instance_pb2.GetInstanceRequest, context: grpc.aio.ServicerContext
    ) -> instance_pb2.GetInstanceResponse:  # type: ignore[type-arg]
        entry = self.routes.lookup(context, _meta(context, "x-cyberdesk-tenant"), request.instance_id)
        context.set_trailing_metadata((("x-seen-traceparent", _meta(context, "traceparent")),))
        return instance_pb2.GetInstanceResponse(
            instance=instance_pb2.Instance(instance_id=request.instance_id, state=STATES[entry["state"]])
        )


class Processes(process_pb2_grpc.ProcessServiceServicer):
    def __init__(self, markers: Path) -> None:
        self.markers = markers

    async def StartProcess(
        self, request: process_pb2.StartProcessRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[process_pb2.StartProcessResponse]:  # type: ignore[type-arg]
        argv = list(request.argv) or ["bash", "-c", request.command]
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            yield process_pb2.StartProcessResponse(
                event=process_pb2.ProcessEvent(started=process_pb2.ProcessStarted(pid=proc.pid))
            )
            while chunk := await proc.stdout.read(65536):
                yield process_pb2.StartProcessResponse(event=process_pb2.ProcessEvent(stdout=chunk))
            code = await proc.wait()
            yield process_pb2.StartProcessResponse(
                event=process_pb2.ProcessEvent(exited=process_pb2.ProcessExited(exit_code=code))
            )
        except asyncio.CancelledError:
            (self.markers / "cancelled").write_text(str(proc.pid))
            raise
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def ConnectPty(
        self, request_iterator: AsyncIterator[process_pb2.ConnectPtyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[process_pb2.ConnectPtyResponse]:  # type: ignore[type-arg]
        yield process_pb2.ConnectPtyResponse(started=process_pb2.ProcessStarted(pid=os.getpid()))
        async for request in request_iterator:
            if request.HasField("input"):
                yield process_pb2.ConnectPtyResponse(output=request.input)
        yield process_pb2.ConnectPtyResponse(exited=process_pb2.ProcessExited(exit_code=0))


class Files(filesystem_pb2_grpc.FilesystemServiceServicer):
    async def UploadFile(
        self, request_iterator: AsyncIterator[filesystem_pb2.UploadFileRequest], context: grpc.aio.ServicerContext
    ) -> filesystem_pb2.UploadFileResponse:  # type: ignore[type-arg]
        digest = hashlib.sha256()
        size = 0
        out = None
        path = ""
        try:
            async for request in request_iterator:
                if request.HasField("header"):
                    path = request.header.path
                    out = open(path, "wb")  # noqa: SIM115 - closed in finally
                elif out is not None:
                    out.write(request.chunk)
                    digest.update(request.chunk)
                    size += len(request.chunk)
        finally:
            if out is not None:
                out.close()
        return filesystem_pb2.UploadFileResponse(path=path, size=size, sha256=digest.hexdigest())

    async def DownloadFile(
        self, request: filesystem_pb2.DownloadFileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[filesystem_pb2.DownloadFileResponse]:  # type: ignore[type-arg]
        digest = hashlib.sha256()
        path = Path(request.path)
        if not path.is_file():
            raise not_found(f"{request.path} does not exist")
        total = path.stat().st_size
        with path.open("rb") as src:
            first = True
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                yield filesystem_pb2.DownloadFileResponse(chunk=chunk, total_size=total if first else 0)
                first = False
        yield filesystem_pb2.DownloadFileResponse(sha256=digest.hexdigest())


def spec(role: str) -> ServerSpec:
    addr = os.environ["UPSTREAM_ADDR"]
    if role == "instance":
        routes = _Routes(Path(os.environ["UPSTREAM_ROUTES"]), os.environ["CYBERDESK_INTERNAL_TOKEN"])

        def register_instance(server: grpc.aio.Server) -> Sequence[str]:
            routing_pb2_grpc.add_RoutingServiceServicer_to_server(Routing(routes), server)
            instance_pb2_grpc.add_InstanceServiceServicer_to_server(Instances(routes), server)
            return ["cyberdesk.internal.v1.RoutingService", "cyberdesk.v1.InstanceService"]

        return ServerSpec(name="upstream-instance", addresses=[addr], register=register_instance)

    markers = Path(os.environ["UPSTREAM_MARKERS"])

    def register_agent(server: grpc.aio.Server) -> Sequence[str]:
        process_pb2_grpc.add_ProcessServiceServicer_to_server(Processes(markers), server)
        filesystem_pb2_grpc.add_FilesystemServiceServicer_to_server(Files(), server)
        return ["cyberdesk.v1.ProcessService", "cyberdesk.v1.FilesystemService"]

    return ServerSpec(
        name="upstream-agent",
        addresses=[addr],
        register=register_agent,
        interceptors=[TokenInterceptor(os.environ["UPSTREAM_TOKEN"])],
        grace_seconds=1.0,
    )


if __name__ == "__main__":
    setup_logging("upstream")
    asyncio.run(serve(spec(sys.argv[1])))
