"""Wiring of billing_svc's gRPC server."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from cyberdesk_common.config import env_str
from cyberdesk_common.grpc_server import ServerSpec


def build_spec() -> ServerSpec:
    """The server of billing_svc, listening on CYBERDESK_BILLING_ADDR (default 127.0.0.1:50071)."""

    def register(server: grpc.aio.Server) -> Sequence[str]:
        return []

    return ServerSpec(name="billing_svc", addresses=[env_str("BILLING_ADDR", "127.0.0.1:50071")], register=register)
