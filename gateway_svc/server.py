"""Wiring of gateway_svc's gRPC server."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from cyberdesk_common.config import env_str
from cyberdesk_common.grpc_server import ServerSpec


def build_spec() -> ServerSpec:
    """The server of gateway_svc, listening on CYBERDESK_GATEWAY_ADDR (default 127.0.0.1:50051)."""

    def register(server: grpc.aio.Server) -> Sequence[str]:
        return []

    return ServerSpec(name="gateway_svc", addresses=[env_str("GATEWAY_ADDR", "127.0.0.1:50051")], register=register)
