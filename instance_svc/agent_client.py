"""Calls from instance_svc to a guest agent (binding a warm-pool agent to its instance).

How an agent is dialed (unix socket or TCP with TLS) and which metadata it requires are shared
with the gateway: `cyberdesk_common.agent_channel`.
"""

from __future__ import annotations

from cyberdesk_common.agent_channel import agent_metadata, open_agent_channel
from cyberdesk_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from instance_svc.runtime.base import AgentEndpoint


async def configure(endpoint: AgentEndpoint, instance_id: str, env: dict[str, str], call_seconds: float = 5.0) -> None:
    """Bind the agent to `instance_id` with `env` for every later process."""
    async with open_agent_channel(endpoint) as chan:
        stub = agent_pb2_grpc.AgentServiceStub(chan)
        await stub.ConfigureAgent(
            agent_pb2.ConfigureAgentRequest(instance_id=instance_id, env=env),
            metadata=agent_metadata(endpoint.token),
            timeout=call_seconds,
        )
