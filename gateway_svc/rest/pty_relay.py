"""The WebSocket PTY (`GET .../pty` with `Upgrade: websocket`): one socket relayed to one ConnectPty call.

The handshake admits the caller before it is accepted: the key comes from the `authorization` /
`x-api-key` headers or, for clients that cannot set headers (browsers), from a subprotocol
`cyberdesk.key.<key>`; offer `cyberdesk.v1` too and the server selects it. A refused handshake is
an HTTP error response with the usual JSON Status body. Frames (see `control_frames`): binary =
terminal bytes both ways, text = JSON control. The socket closes with 1000 after `exit`, and with
4000 + the gRPC code after an `error` that ends the call. A handshake whose Origin is another
site's and not allowed by CYBERDESK_CORS_ORIGINS is refused with 403 (`cors`). The relay leaves
the terminal with `detach` rather than cancelling the call, so keystrokes sent just before still
reach it (a cancelled call drops them in flight): on a `detach` frame, after which the socket
closes with 1000 "detached" once the agent has applied everything before it, and when the client
closes the socket (then the next client's keystrokes may overtake the last ones of this one).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import MutableMapping
from typing import Any, cast

import grpc

from cyberdesk_common.status import RpcError, invalid_argument
from cyberdesk_proto.v1 import process_pb2
from gateway_svc.rest import control_frames, http_errors, json_mapping
from gateway_svc.rest.asgi import Receive, Scope, Send, request_headers, request_path
from gateway_svc.rest.cors import CorsPolicy
from gateway_svc.rest.http_bindings import BindingTable, HttpBinding
from gateway_svc.rest.path_templates import PathDecodeError
from gateway_svc.rest.upstream import BidiStream, Upstream

WS_SUBPROTOCOL = "cyberdesk.v1"
WS_KEY_PREFIX = "cyberdesk.key."
# How long the agent gets to end the call after a `detach` before it is cancelled (an older agent
# ignores the detach and only ends the call for the cancel).
DETACH_GRACE_SECONDS = 5.0


async def serve_pty_websocket(
    upstream: Upstream, table: BindingTable, scope: Scope, receive: Receive, send: Send, cors: CorsPolicy | None = None
) -> None:
    """Admit the caller, accept the WebSocket and relay it until either side ends."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    path = request_path(scope)
    headers = request_headers(scope)
    if not (cors or CorsPolicy()).websocket_allowed(headers, scope.get("scheme", "ws")):
        # Browsers apply no CORS to WebSockets, so the page's Origin is checked here (cors.py).
        origin = headers.get("origin")
        denied = RpcError(grpc.StatusCode.PERMISSION_DENIED, f"origin {origin} is not allowed (CYBERDESK_CORS_ORIGINS)")
        await reject_handshake(scope, send, http_errors.from_rpc_error(denied))
        return
    offered: list[str] = list(scope.get("subprotocols") or [])
    for proto in offered:
        if proto.startswith(WS_KEY_PREFIX) and "authorization" not in headers and "x-api-key" not in headers:
            headers["x-api-key"] = proto[len(WS_KEY_PREFIX) :]
    try:
        found = table.match("GET", path)
        if found is None or not found.binding.websocket:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"no WebSocket route for {path}")
        binding = found.binding
        first: Any = json_mapping.decode_request(binding, found.variables, scope.get("query_string", b""), None)
        call = await upstream.open_bidi(binding, first.instance_id, headers)
    except (RpcError, PathDecodeError) as exc:
        rpc = exc if isinstance(exc, RpcError) else invalid_argument(str(exc))
        await reject_handshake(scope, send, http_errors.from_rpc_error(rpc))
        return
    accept: dict[str, Any] = {"type": "websocket.accept"}
    if WS_SUBPROTOCOL in offered:
        accept["subprotocol"] = WS_SUBPROTOCOL
    await send(accept)
    await PtyRelay(call, first, receive, send).run()


def upgrade_required(binding: HttpBinding) -> http_errors.HttpError:
    """426 for a plain HTTP request on the WebSocket binding."""
    err = http_errors.from_status(
        grpc.StatusCode.INVALID_ARGUMENT, f"{binding.qualified_name} is a WebSocket: connect with Upgrade: websocket"
    )
    return http_errors.HttpError(426, err.body, {"Upgrade": "websocket", "Connection": "Upgrade"})


async def reject_handshake(scope: Scope, send: Send, err: http_errors.HttpError) -> None:
    """Refuse a WebSocket handshake with an HTTP error response (or a close, if the server cannot)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        await send({"type": "websocket.http.response.start", "status": err.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": err.body_bytes()})
        return
    await send({"type": "websocket.close", "code": 1008})


class PtyRelay:
    """Relays one accepted WebSocket to one ConnectPty call until either side ends.

    Two tasks share the socket: `run` (upstream responses -> client) and `_inbound` (client
    frames -> upstream). Sends go through one lock so their frames never interleave, and once the
    client is gone (`closed`) nothing more is sent. `client_left` tells a cancellation caused by
    the client leaving (which ends the relay quietly) from one of the relay itself.
    """

    def __init__(self, call: BidiStream, first: Any, receive: Receive, send: Send) -> None:
        self.call, self.first = call, first
        self.receive, self._send = receive, send
        self._lock = asyncio.Lock()
        self.closed = False
        self.client_left = False
        self._grace: asyncio.TimerHandle | None = None
        self.detached = False

    async def send_text(self, text: str) -> None:
        """Send one text (control) frame."""
        await self.send({"type": "websocket.send", "text": text})

    async def send(self, message: MutableMapping[str, Any]) -> None:
        """Send one ASGI message unless the client is gone."""
        if self.closed:
            return
        async with self._lock:
            try:
                await self._send(message)
            except (OSError, RuntimeError):
                # The client is gone (uvicorn raises ClientDisconnected, an OSError).
                self.closed = True

    async def close(self, code: int, reason: str = "") -> None:
        """Close the socket with `code` (reason cut to fit a close frame)."""
        await self.send({"type": "websocket.close", "code": code, "reason": reason[:120]})
        self.closed = True

    async def fail(self, err: RpcError) -> None:
        """Report a failure of the call in an `error` frame, then close with 4000 + its code."""
        await self.send_text(control_frames.error_frame(err))
        await self.close(control_frames.close_code(err.code), err.code.name)

    async def run(self) -> None:
        """Open the terminal (from the query or the client's first frame), then relay both ways."""
        try:
            if not (self.first.HasField("open") or self.first.HasField("attach")):
                got = await self._first_control()
                if got is None:
                    self.call.cancel()
                    return
                self.first = got
            await self.call.write(self.first)
        except RpcError as exc:
            self.call.cancel()
            await self.fail(exc)
            return
        inbound = asyncio.create_task(self._inbound())
        try:
            async for reply in self.call.responses():
                frame = control_frames.server_frame(cast(process_pb2.ConnectPtyResponse, reply))
                if isinstance(frame, bytes):
                    await self.send({"type": "websocket.send", "bytes": frame})
                elif frame is not None:
                    await self.send_text(frame)
            await self.close(1000, "detached" if self.detached else "exit")
        except RpcError as exc:
            await self.fail(exc)
        except asyncio.CancelledError:
            # grpc.aio reports the call we cancelled (the client left, or the agent did not end a
            # detached call in time) as CancelledError; only a cancellation of this task must propagate.
            task = asyncio.current_task()
            if not (self.client_left or self.detached) or (task is not None and task.cancelling()):
                raise
            await self.close(1000, "detached")
        finally:
            inbound.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await inbound
            if self._grace is not None:
                self._grace.cancel()
            self.call.cancel()

    async def _first_control(self) -> Any | None:
        """Wait for the client's `open` or `attach` frame; None when it went away."""
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                return None
            text = message.get("text")
            if text is None:
                raise invalid_argument('send {"type": "open", ...} or {"type": "attach", ...} before terminal bytes')
            request = control_frames.parse_control_frame(text, first=True)
            request.instance_id = self.first.instance_id
            return request

    async def _detach(self) -> None:
        self.detached = True
        # The timer runs from before the write: the write itself waits while the agent reads nothing.
        self._grace = asyncio.get_running_loop().call_later(DETACH_GRACE_SECONDS, self.call.cancel)
        try:
            await self.call.write(process_pb2.ConnectPtyRequest(detach=process_pb2.PtyDetach()))
            await self.call.done_writing()
        except RpcError:
            self.call.cancel()

    async def _inbound(self) -> None:
        try:
            while True:
                message = await self.receive()
                if message["type"] == "websocket.disconnect":
                    # The client left: detach this client only (the terminal goes on if it is a
                    # background one); `run` reads on until the agent ends the call.
                    self.client_left = self.closed = True
                    await self._detach()
                    return
                data = message.get("bytes")
                if data is not None:
                    await self.call.write(process_pb2.ConnectPtyRequest(input=data))
                    continue
                try:
                    request = control_frames.parse_control_frame(message.get("text") or "", first=False)
                except RpcError as exc:
                    # A bad control frame is reported and skipped; the terminal stays open.
                    await self.send_text(control_frames.error_frame(exc))
                    continue
                if request.HasField("detach"):
                    await self._detach()
                    return
                await self.call.write(request)
        except RpcError:
            return  # the call ended; the response side reports how
