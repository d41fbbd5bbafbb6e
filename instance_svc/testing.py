"""A stand-in for instance_svc, for testing its clients (the gateway): `python -m instance_svc.testing`.

A real gRPC server run as a process, by the gateway tests and by bench/gateway_proxy.py and
bench/gateway_shells.py (so it lives here, as kopf.testing and grpclib.testing do, not in tests/).
It stands in for instance_svc's RoutingService.ResolveInstance and InstanceService.GetInstance over
a routes file (JSON: {instance_id: {tenant, state, target, token}}), re-read on every call so a test
can move an instance to another state or agent. It trusts `x-cyberdesk-tenant` only with the
internal token, like instance_svc, and answers another tenant's instance with NOT_FOUND.
GetInstance returns the `traceparent` it received in the `x-seen-traceparent` trailer.

Why a stand-in still: the real instance_svc only routes to instances it created, which needs real
sandboxes per test; the gateway tests need many instances in chosen states (PAUSED, another
tenant's) pointing at agents the test controls (one it SIGKILLs mid-stream). The REST end-to-end
tests in tests/gateway_svc/rest run against the real instance_svc. The agents behind it are the
real guest agent (`python -m guest_agent`), see conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from cyberdesk_common.grpc_server import ServerSpec, serve
from cyberdesk_common.log import setup_logging
from cyberdesk_common.metadata import INTERNAL_TOKEN_METADATA, TENANT_METADATA
from cyberdesk_common.status import RpcError, not_found
from cyberdesk_proto.internal.v1 import routing_pb2, routing_pb2_grpc
from cyberdesk_proto.v1 import (
    instance_pb2,
    instance_pb2_grpc,
)

Context = grpc.aio.ServicerContext[Any, Any]
STATES = {name.removeprefix("INSTANCE_STATE_"): value for name, value in instance_pb2.InstanceState.items()}


def _meta(context: Context, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


class _Routes:
    def __init__(self, path: Path, token: str) -> None:
        self.path, self.token = path, token

    def lookup(self, context: Context, tenant: str, instance_id: str) -> dict[str, str]:
        if _meta(context, INTERNAL_TOKEN_METADATA) != self.token:
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
        self, request: routing_pb2.ResolveInstanceRequest, context: Context
    ) -> routing_pb2.ResolveInstanceResponse:
        entry = self.routes.lookup(context, request.tenant_id, request.instance_id)
        return routing_pb2.ResolveInstanceResponse(
            state=STATES[entry["state"]], agent_target=entry["target"], agent_token=entry["token"]
        )


class Instances(instance_pb2_grpc.InstanceServiceServicer):
    def __init__(self, routes: _Routes) -> None:
        self.routes = routes

    async def GetInstance(
        self, request: instance_pb2.GetInstanceRequest, context: Context
    ) -> instance_pb2.GetInstanceResponse:
        entry = self.routes.lookup(context, _meta(context, TENANT_METADATA), request.instance_id)
        context.set_trailing_metadata((("x-seen-traceparent", _meta(context, "traceparent")),))
        return instance_pb2.GetInstanceResponse(
            instance=instance_pb2.Instance(instance_id=request.instance_id, state=STATES[entry["state"]])
        )


def spec() -> ServerSpec:
    """The stand-in's server: UPSTREAM_ADDR to listen on, UPSTREAM_ROUTES the routes file."""
    addr = os.environ["UPSTREAM_ADDR"]
    routes = _Routes(Path(os.environ["UPSTREAM_ROUTES"]), os.environ["CYBERDESK_INTERNAL_TOKEN"])

    def register(server: grpc.aio.Server) -> Sequence[str]:
        routing_pb2_grpc.add_RoutingServiceServicer_to_server(Routing(routes), server)
        # Only GetInstance is stood in for; every other method answers UNIMPLEMENTED (the base's default).
        instance_pb2_grpc.add_InstanceServiceServicer_to_server(Instances(routes), server)  # type: ignore[abstract]
        return ["cyberdesk.internal.v1.RoutingService", "cyberdesk.v1.InstanceService"]

    return ServerSpec(name="instance-stand-in", addresses=[addr], register=register)


if __name__ == "__main__":
    setup_logging("instance-stand-in")
    asyncio.run(serve(spec()))
