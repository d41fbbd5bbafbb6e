"""Dialing a guest agent: the one place that decides between a unix socket and TCP with TLS.

Used by the gateway (its pooled channel per agent) and instance_svc (binding a warm-pool agent).
The rule: a unix socket is plain (the socket's directory, readable only by the platform, is the
boundary); a TCP agent (a VM) is always TLS, because its bearer token must never cross a network
in clear text. The call metadata (the per-instance bearer token) comes from
`cyberdesk_common.metadata.agent_metadata`.
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc

from cyberdesk_common.channel_options import CHANNEL_OPTIONS
from cyberdesk_common.metadata import agent_metadata

__all__ = ["AgentAddress", "agent_metadata", "open_agent_channel"]


class AgentAddress(Protocol):
    """Where an agent listens: `instance_svc.runtime.base.AgentEndpoint` and the gateway's `AgentRoute`."""

    @property
    def target(self) -> str:
        """ "unix:///abs/path/agent.sock" or "host:port" (TLS)."""

    @property
    def ca_pem(self) -> str:
        """PEM of the CA that signed a TCP agent's certificate ("" for the system roots)."""

    @property
    def server_name(self) -> str:
        """The name to check in a TCP agent's certificate ("" for the target's host)."""


def open_agent_channel(
    address: AgentAddress, options: tuple[tuple[str, Any], ...] = CHANNEL_OPTIONS
) -> grpc.aio.Channel:
    """A new grpc.aio channel to the agent at `address` (the caller closes it)."""
    opts = list(options)
    if address.target.startswith("unix:"):
        return grpc.aio.insecure_channel(address.target, options=opts)
    creds = grpc.ssl_channel_credentials(root_certificates=address.ca_pem.encode() or None)
    if address.server_name:
        opts.append(("grpc.ssl_target_name_override", address.server_name))
    return grpc.aio.secure_channel(address.target, creds, options=opts)
