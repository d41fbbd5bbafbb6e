"""AgentService: readiness information, and binding a warm-pool agent to the instance that claims it."""

from __future__ import annotations

import os
import time

import grpc

from cyberdesk_common.status import failed_precondition, invalid_argument
from cyberdesk_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from guest_agent import __version__
from guest_agent.identity import Identity


class AgentInfoServicer(agent_pb2_grpc.AgentServiceServicer):
    """Serves cyberdesk.agent.v1.AgentService."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self._started = time.monotonic()

    async def GetAgentInfo(
        self,
        request: agent_pb2.GetAgentInfoRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> agent_pb2.GetAgentInfoResponse:
        """Version, bound instance, desktop availability and uptime."""
        display = self._identity.display
        return agent_pb2.GetAgentInfoResponse(
            version=__version__,
            instance_id=self._identity.instance_id,
            desktop_available=bool(display),
            display=display,
            pid=os.getpid(),
            uptime_seconds=time.monotonic() - self._started,
        )

    async def ConfigureAgent(
        self,
        request: agent_pb2.ConfigureAgentRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> agent_pb2.ConfigureAgentResponse:
        """Bind to an instance (once) and set the environment of later processes."""
        if not request.instance_id:
            raise invalid_argument("instance_id is required")
        current = self._identity.instance_id
        if current and current != request.instance_id:
            raise failed_precondition(f"this agent already serves instance {current}")
        self._identity.bind(request.instance_id, dict(request.env))
        return agent_pb2.ConfigureAgentResponse()
