"""PortService.OpenPort: a byte tunnel from the agent's caller to a TCP port inside the instance.

The agent dials the port as the instance sees it (127.0.0.1, then ::1 for a service bound to the
IPv6 loopback only, as Node's `localhost` often is), so a sandbox without any network, whose
loopback is its own, and a VM are served the same way. Bytes are relayed unchanged both ways:
the gateway speaks HTTP/1.1 or WebSocket through the tunnel, the agent knows no protocol.

Who closes what: the two directions are independent, as in TCP. The caller's half-close becomes a
`shutdown(SHUT_WR)` toward the service (it reads EOF) while the service's answer keeps flowing; the
service closing its sending side becomes an `eof` response while the caller may still send. The
call ends OK once both directions are closed, or with the failure of either (a reset connection
is UNAVAILABLE); the caller cancelling the call closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from cyberdesk_common.status import RpcError, invalid_argument
from cyberdesk_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from guest_agent.identity import Identity
from guest_agent.vnc import VncServer, unreachable

# One read of the service's bytes per response message: big enough that a large download costs
# few messages, small enough that a streamed response (server-sent events) is never held back,
# since a read returns whatever has arrived.
READ_SIZE = 256 * 1024
_LOOPBACKS = ("127.0.0.1", "::1")

Context = grpc.aio.ServicerContext[Any, Any]


async def dial(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to `port` on the instance's loopback; UNAVAILABLE naming the port when nothing listens."""
    refused: OSError | None = None
    for host in _LOOPBACKS:
        try:
            return await asyncio.open_connection(host, port, limit=READ_SIZE)
        except ConnectionRefusedError as err:
            refused = err
        except OSError as err:
            # ::1 may not exist at all (no IPv6 in the sandbox): that is "nothing listens" too.
            refused = refused or err
    raise RpcError(grpc.StatusCode.UNAVAILABLE, f"nothing listens on port {port} in the instance") from refused


class PortServicer(agent_pb2_grpc.PortServiceServicer):
    """Serves cyberdesk.agent.v1.PortService."""

    def __init__(self, identity: Identity, vnc: VncServer | None = None) -> None:
        self._identity = identity
        self._vnc = vnc or VncServer(identity)

    async def OpenPort(
        self, request_iterator: AsyncIterator[agent_pb2.OpenPortRequest], context: Context
    ) -> AsyncIterator[agent_pb2.OpenPortResponse]:
        """Relay bytes between the call and a TCP port of the instance (see the module docstring)."""
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            raise invalid_argument("the stream was empty: the first message must name the port") from None
        self._identity.check(first.instance_id)
        if first.desktop:
            # The desktop's VNC server (guest_agent/vnc.py), started here when it is not running.
            port = await self._vnc.port()
            try:
                reader, writer = await dial(port)
            except RpcError as err:
                raise unreachable(err) from None
        else:
            if not 1 <= first.port <= 65535:
                raise invalid_argument(f"port must be 1 to 65535, got {first.port}")
            port = first.port
            reader, writer = await dial(port)
        if first.data:
            writer.write(first.data)
        pump = asyncio.create_task(_pump(request_iterator, writer))
        try:
            yield agent_pb2.OpenPortResponse(connected=True)
            while True:
                try:
                    data = await reader.read(READ_SIZE)
                except OSError as err:
                    raise _reset(port, err) from None
                if not data:
                    break
                yield agent_pb2.OpenPortResponse(data=data)
            if not pump.done():
                # The service is done sending; the caller may still be sending (a half-closed
                # request), so the call stays open until it half-closes too.
                yield agent_pb2.OpenPortResponse(eof=True)
            try:
                await pump
            except OSError as err:
                raise _reset(port, err) from None
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _pump(requests: AsyncIterator[agent_pb2.OpenPortRequest], writer: asyncio.StreamWriter) -> None:
    """The caller's bytes to the service, each write drained (TCP pushes back on the call), then EOF."""
    async for message in requests:
        if message.data:
            writer.write(message.data)
            await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


def _reset(port: int, err: OSError) -> RpcError:
    message = f"the service on port {port} in the instance dropped the connection ({err.strerror})"
    return RpcError(grpc.StatusCode.UNAVAILABLE, message)
