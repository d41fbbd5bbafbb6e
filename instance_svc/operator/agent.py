"""The operator's calls to a VM's guest agent: is it up with this token over TLS, and bind it.

An instance is Running only once its own agent answered: the call goes to the VMI's address with
TLS, trusting only the VM's own CA and checking the name in its certificate, and carries the
VM's token, so an answer proves the agent is the one the Secret was made for.
"""

from __future__ import annotations

import grpc

from cyberdesk_common.agent_channel import agent_metadata, open_agent_channel
from cyberdesk_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from instance_svc import agent_client
from instance_svc.runtime.base import AgentEndpoint


class AgentNotReady(Exception):
    """The agent did not answer (yet): connection refused, TLS not up, timeout."""


class AgentRefused(Exception):
    """The agent answered but refused (wrong token, bound to another instance): retrying will not help."""


async def probe(endpoint: AgentEndpoint, call_seconds: float) -> str:
    """GetAgentInfo with the token; returns the instance the agent serves ("" for an unbound one)."""
    try:
        async with open_agent_channel(endpoint) as chan:
            stub = agent_pb2_grpc.AgentServiceStub(chan)
            info = await stub.GetAgentInfo(
                agent_pb2.GetAgentInfoRequest(), metadata=agent_metadata(endpoint.token), timeout=call_seconds
            )
            return str(info.instance_id)
    except grpc.aio.AioRpcError as e:
        if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise AgentRefused(f"the agent refused the token: {e.details()}") from None
        raise AgentNotReady(f"{e.code().name}: {e.details()}") from None


async def bind(endpoint: AgentEndpoint, instance_id: str, env: dict[str, str], call_seconds: float) -> None:
    """ConfigureAgent: the agent serves `instance_id` with `env` from now on (idempotent for the same id)."""
    try:
        await agent_client.configure(endpoint, instance_id, env, call_seconds)
    except grpc.aio.AioRpcError as e:
        if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED):
            raise AgentRefused(e.details() or e.code().name) from None
        raise AgentNotReady(f"{e.code().name}: {e.details()}") from None
