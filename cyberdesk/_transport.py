"""Channels, stubs and error translation shared by the sync and async clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import grpc
import grpc.aio

from cyberdesk._config import ClientConfig
from cyberdesk._errors import from_rpc_error
from cyberdesk._requests import MAX_MESSAGE
from cyberdesk_proto.internal.v1 import auth_pb2_grpc
from cyberdesk_proto.v1 import desktop_pb2_grpc, filesystem_pb2_grpc, instance_pb2_grpc, process_pb2_grpc

T = TypeVar("T")

_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # Long-lived streams (a shell, a background command) cross idle NATs and proxies.
    ("grpc.keepalive_time_ms", 30_000),
]


def _metadata(config: ClientConfig) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {config.api_key}"),)


class Transport:
    """A blocking channel with one stub per service; every call carries the API key."""

    def __init__(self, config: ClientConfig, timeout: float) -> None:
        self.config = config
        self.timeout = timeout
        if config.secure:
            self.channel = grpc.secure_channel(config.target, grpc.ssl_channel_credentials(), options=_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(config.target, options=_OPTIONS)
        self.metadata = _metadata(config)
        self.instances = instance_pb2_grpc.InstanceServiceStub(self.channel)
        self.process = process_pb2_grpc.ProcessServiceStub(self.channel)
        self.files = filesystem_pb2_grpc.FilesystemServiceStub(self.channel)
        self.desktop = desktop_pb2_grpc.DesktopServiceStub(self.channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(self.channel)

    def unary(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        """Call a unary (or stream-unary, given an iterator) method; errors become CyberdeskError."""
        try:
            return method(request, metadata=self.metadata, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def stream(self, method: Callable[..., Any], request: Any) -> Any:
        """Start a server-streaming call; no deadline, so a long command is never cut off by one."""
        try:
            return method(request, metadata=self.metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self.channel.close()


def iterate(call: Any) -> Iterator[Any]:
    """Iterate a streaming call's responses; errors become CyberdeskError."""
    try:
        yield from call
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


class AsyncTransport:
    """An asyncio channel with one stub per service; every call carries the API key."""

    def __init__(self, config: ClientConfig, timeout: float) -> None:
        self.config = config
        self.timeout = timeout
        if config.secure:
            self.channel = grpc.aio.secure_channel(config.target, grpc.ssl_channel_credentials(), options=_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(config.target, options=_OPTIONS)
        self.metadata = _metadata(config)
        self.instances = instance_pb2_grpc.InstanceServiceStub(self.channel)
        self.process = process_pb2_grpc.ProcessServiceStub(self.channel)
        self.files = filesystem_pb2_grpc.FilesystemServiceStub(self.channel)
        self.desktop = desktop_pb2_grpc.DesktopServiceStub(self.channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(self.channel)

    async def unary(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 (a gRPC deadline)
        """Await a unary (or stream-unary) call; errors become CyberdeskError."""
        try:
            return await method(request, metadata=self.metadata, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def stream(self, method: Callable[..., Any], request: Any) -> Any:
        """Start a streaming call (no deadline)."""
        return method(request, metadata=self.metadata)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close(None)


async def aiterate(call: Any) -> AsyncIterator[Any]:
    """Iterate an aio streaming call's responses; errors become CyberdeskError."""
    try:
        async for item in call:
            yield item
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None
