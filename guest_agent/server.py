"""Wiring of the guest agent's gRPC server."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from cyberdesk_common.grpc_server import ServerSpec
from cyberdesk_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from cyberdesk_proto.v1 import desktop_pb2, desktop_pb2_grpc, filesystem_pb2, filesystem_pb2_grpc
from guest_agent.agent_info import AgentInfoServicer
from guest_agent.auth import TokenInterceptor
from guest_agent.config import AgentConfig
from guest_agent.desktop import DesktopServicer
from guest_agent.files import FilesystemServicer
from guest_agent.identity import Identity
from guest_agent.ports import PortServicer
from guest_agent.process import PROCESS_SERVICE, ProcessServicer


def build_spec(config: AgentConfig, identity: Identity) -> ServerSpec:
    """The server of one agent: its services behind the token check."""

    def register(server: grpc.aio.Server) -> Sequence[str]:
        agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentInfoServicer(identity), server)
        filesystem_pb2_grpc.add_FilesystemServiceServicer_to_server(FilesystemServicer(identity), server)
        desktop_pb2_grpc.add_DesktopServiceServicer_to_server(DesktopServicer(identity), server)
        ProcessServicer(identity).register(server)
        agent_pb2_grpc.add_PortServiceServicer_to_server(PortServicer(identity), server)
        return [
            agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
            filesystem_pb2.DESCRIPTOR.services_by_name["FilesystemService"].full_name,
            desktop_pb2.DESCRIPTOR.services_by_name["DesktopService"].full_name,
            PROCESS_SERVICE,
            agent_pb2.DESCRIPTOR.services_by_name["PortService"].full_name,
        ]

    return ServerSpec(
        name="guest_agent",
        addresses=[config.listen],
        register=register,
        grace_seconds=config.grace_seconds,
        tls_cert_chain=config.tls_cert,
        tls_private_key=config.tls_key,
        interceptors=[TokenInterceptor(config.token)],
    )
