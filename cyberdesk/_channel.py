"""What both clients' transports share: channel options, the API-key metadata, deadlines, one stub per service."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cyberdesk._config import ClientConfig
from cyberdesk._errors import CyberdeskError
from cyberdesk._requests import MAX_MESSAGE
from cyberdesk_proto.internal.v1 import auth_pb2_grpc
from cyberdesk_proto.v1 import (
    billing_pb2_grpc,
    desktop_pb2_grpc,
    filesystem_pb2_grpc,
    instance_pb2_grpc,
    ports_pb2_grpc,
    process_pb2_grpc,
)

OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # Long-lived streams (a shell, a background command) cross idle NATs and proxies.
    ("grpc.keepalive_time_ms", 30_000),
]


def call_metadata(config: ClientConfig) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: the API key."""
    return (("authorization", f"Bearer {config.api_key}"),)


END = object()
"""Put in a duplex stream's reply queue when the call has ended (or was closed by us)."""

CLOSE_GRACE_SECONDS = 5.0
"""How long a duplex stream closed with a farewell (a terminal's detach) waits for the server to end it."""

REPLY_WINDOW = 64
"""Replies a duplex stream takes from the call ahead of its reader (a terminal's are at most 64 KiB).

Bounded so that a reader that falls behind (a slow local terminal under `seq 1 3000000`) stops the
call being read: gRPC's flow control then holds the server back, and the agent waits for that
reader (guest_agent/pty.py), instead of the client's memory taking the whole output.
"""


def settle(item: Any, put_back: Callable[[Any], None]) -> Any | None:
    """A reply taken from a duplex stream's reply queue: the reply, None at the end, or its error raised.

    The end and an error are put back, so that every later read sees them too.
    """
    if isinstance(item, CyberdeskError):
        put_back(item)
        raise item
    if item is END:
        put_back(item)
        return None
    return item


def open_channel(grpc_module: Any, config: ClientConfig) -> Any:
    """A channel to the endpoint from `grpc` or `grpc.aio` (both name their constructors alike)."""
    import grpc

    if config.secure:
        return grpc_module.secure_channel(config.target, grpc.ssl_channel_credentials(), options=OPTIONS)
    return grpc_module.insecure_channel(config.target, options=OPTIONS)


def deadline_of(timeout: float | None, default: float, bounded: bool) -> float | None:
    """A unary call's deadline in seconds: `timeout`, else the client's default; none when unbounded."""
    return (timeout or default) if bounded else None


class Stubs:
    """A channel, what every call on it carries, and one stub per service (blocking or grpc.aio alike)."""

    def __init__(self, config: ClientConfig, timeout: float, channel: Any) -> None:
        self.config = config
        self.timeout = timeout
        self.channel = channel
        self.metadata = call_metadata(config)
        self.instances = instance_pb2_grpc.InstanceServiceStub(channel)
        self.process = process_pb2_grpc.ProcessServiceStub(channel)
        self.files = filesystem_pb2_grpc.FilesystemServiceStub(channel)
        self.desktop = desktop_pb2_grpc.DesktopServiceStub(channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(channel)
        self.previews = ports_pb2_grpc.PreviewServiceStub(channel)
        self.billing = billing_pb2_grpc.BillingServiceStub(channel)
        self.viewers = ports_pb2_grpc.DesktopViewerServiceStub(channel)
