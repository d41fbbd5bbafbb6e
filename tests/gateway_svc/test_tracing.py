"""One trace across caller, gateway and agent: the gateway, the routing stand-in and the real guest
agent's server (guest_agent.server.build_spec, bound to the instance) run in this process with
`grpc_server.start()` (so they get the shared tracing interceptor), and an in-memory exporter records
every span."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cyberdesk_common.grpc_server import start
from cyberdesk_proto.v1 import process_pb2, process_pb2_grpc
from gateway_svc.config import GatewayConfig
from gateway_svc.server import Gateway, build_spec
from guest_agent.config import AgentConfig
from guest_agent.identity import Identity
from guest_agent.server import build_spec as agent_spec
from instance_svc.testing import spec as stand_in_spec
from tests.gateway_svc.conftest import AGENT_TOKEN, INTERNAL_TOKEN
from tests.support.procs import free_port


def _exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def test_one_trace_from_caller_through_gateway_and_routing_to_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    exporter = _exporter()
    agent_target = f"unix://{tmp_path}/agent.sock"
    routes = tmp_path / "routes.json"
    routes.write_text(
        json.dumps({"i-t": {"tenant": "t", "state": "RUNNING", "target": agent_target, "token": AGENT_TOKEN}})
    )
    instance_addr, gw_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    for name, value in {
        "CYBERDESK_STATE_DIR": str(tmp_path / "state"),
        "CYBERDESK_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "CYBERDESK_INSTANCE_ADDR": instance_addr,
        "CYBERDESK_GATEWAY_ADDR": gw_addr,
        "CYBERDESK_REDIS_URL": redis_url,
        "UPSTREAM_ROUTES": str(routes),
        # The agent's children run login shells: a fresh HOME, so they read no one's profile.
        "HOME": str(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)

    async def scenario() -> None:
        monkeypatch.setenv("UPSTREAM_ADDR", instance_addr)
        routing = await start(stand_in_spec())
        agent = await start(
            agent_spec(
                AgentConfig(
                    listen=agent_target,
                    token=AGENT_TOKEN,
                    instance_id="i-t",
                    tls_cert=None,
                    tls_key=None,
                    grace_seconds=1.0,
                ),
                Identity("i-t"),
            )
        )
        gateway = Gateway(GatewayConfig.from_env())
        gw = await start(build_spec(gateway))
        assert gateway.store is not None
        _, secret = gateway.store.create("t", "trace")
        tracer = trace.get_tracer("test-client")
        try:
            async with grpc.aio.insecure_channel(gw_addr) as channel:
                stub = process_pb2_grpc.ProcessServiceStub(channel)
                with tracer.start_as_current_span("client") as client_span:
                    carrier: dict[str, str] = {}
                    propagate.inject(carrier)
                    call = stub.StartProcess(
                        process_pb2.StartProcessRequest(instance_id="i-t", command="echo traced"),
                        metadata=(("authorization", f"Bearer {secret}"), *carrier.items()),
                        timeout=10,
                    )
                    out = b"".join([reply.event.stdout async for reply in call])
                assert out == b"traced\n"
        finally:
            await gw.server.stop(None)
            await gateway.close()
            await agent.server.stop(None)
            await routing.server.stop(None)
        spans = {s.name: s for s in exporter.get_finished_spans()}
        trace_id = client_span.get_span_context().trace_id
        gw_span = next(
            s
            for s in exporter.get_finished_spans()
            if s.name == "cyberdesk.v1.ProcessService/StartProcess"
            and s.parent is not None
            and s.parent.span_id == client_span.get_span_context().span_id
        )
        agent_span = next(
            s
            for s in exporter.get_finished_spans()
            if s.name == "cyberdesk.v1.ProcessService/StartProcess" and s is not gw_span
        )
        resolve_span = spans["cyberdesk.internal.v1.RoutingService/ResolveInstance"]
        assert {gw_span.context.trace_id, agent_span.context.trace_id, resolve_span.context.trace_id} == {trace_id}
        assert agent_span.parent is not None and agent_span.parent.span_id == gw_span.context.span_id
        assert resolve_span.parent is not None and resolve_span.parent.span_id == gw_span.context.span_id

    asyncio.run(scenario())
