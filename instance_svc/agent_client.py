"""Calls from instance_svc to a guest agent (binding a warm-pool agent to its instance)."""

from __future__ import annotations

import grpc

from cyberdesk_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from instance_svc.runtime.base import AgentEndpoint


def channel(endpoint: AgentEndpoint) -> grpc.aio.Channel:
    """A channel to the agent: plain on a unix socket (the socket's directory is the boundary), TLS on TCP."""
    if endpoint.target.startswith("unix:"):
        return grpc.aio.insecure_channel(endpoint.target)
    creds = grpc.ssl_channel_credentials(root_certificates=endpoint.ca_pem.encode() or None)
    options = [("grpc.ssl_target_name_override", endpoint.server_name)] if endpoint.server_name else []
    return grpc.aio.secure_channel(endpoint.target, creds, options=options)


async def configure(endpoint: AgentEndpoint, instance_id: str, env: dict[str, str], call_seconds: float = 5.0) -> None:
    """Bind the agent to `instance_id` with `env` for every later process."""
    async with channel(endpoint) as chan:
        stub = agent_pb2_grpc.AgentServiceStub(chan)
        await stub.ConfigureAgent(
            agent_pb2.ConfigureAgentRequest(instance_id=instance_id, env=env),
            metadata=(("authorization", f"Bearer {endpoint.token}"),),
            timeout=call_seconds,
        )
