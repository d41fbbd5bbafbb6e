"""What both clients' channels share: channel options, the API-key metadata, one stub per service."""

from __future__ import annotations

from typing import Any

from cyberdesk._config import ClientConfig
from cyberdesk._requests import MAX_MESSAGE
from cyberdesk_proto.internal.v1 import auth_pb2_grpc
from cyberdesk_proto.v1 import desktop_pb2_grpc, filesystem_pb2_grpc, instance_pb2_grpc, process_pb2_grpc

OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # Long-lived streams (a shell, a background command) cross idle NATs and proxies.
    ("grpc.keepalive_time_ms", 30_000),
]


def call_metadata(config: ClientConfig) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: the API key."""
    return (("authorization", f"Bearer {config.api_key}"),)


class Stubs:
    """One stub per service on a channel (a blocking or a grpc.aio one: the stubs work on either)."""

    def __init__(self, channel: Any) -> None:
        self.instances = instance_pb2_grpc.InstanceServiceStub(channel)
        self.process = process_pb2_grpc.ProcessServiceStub(channel)
        self.files = filesystem_pb2_grpc.FilesystemServiceStub(channel)
        self.desktop = desktop_pb2_grpc.DesktopServiceStub(channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(channel)
