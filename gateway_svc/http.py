"""A bare ASGI app serving the REST face from the route table (unary and server-streaming JSON routes).

The app does no auth, rate limiting or routing itself: it calls an injected `Upstream`, which the
gateway's server wires to the same auth / rate-limit / tenant / routing code as its gRPC path and
hands the HTTP headers to (as gRPC metadata would be). Raw-body uploads, raw downloads, NDJSON
request streams and WebSocket shells are not served here yet: those routes answer 501.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from cyberdesk_common.status import RpcError, invalid_argument
from gateway_svc.transcode import errors, mapping
from gateway_svc.transcode.pathtemplate import PathDecodeError
from gateway_svc.transcode.rules import Route, RouteTable, build_route_table

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

MAX_JSON_BODY = 4 * 1024 * 1024  # JSON requests are small; bulk bytes travel on the raw-body routes
OPENAPI_FILE = Path(__file__).resolve().parent.parent / "openapi" / "cyberdesk.v1.openapi.json"


class Upstream(Protocol):
    """Calls an RPC on behalf of an HTTP request; raises RpcError or grpc.RpcError on failure."""

    async def unary(self, route: Route, request: Message, headers: Mapping[str, str]) -> Message:
        """One request, one response."""
        ...

    def server_stream(self, route: Route, request: Message, headers: Mapping[str, str]) -> AsyncIterator[Message]:
        """One request, a stream of responses."""
        ...


class RestApp:
    """The ASGI application: `RestApp(upstream)` (route table of cyberdesk.v1 by default)."""

    def __init__(self, upstream: Upstream, table: RouteTable | None = None) -> None:
        self.upstream = upstream
        self.table = table or build_route_table()
        self._openapi: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # WebSocket shells are not served yet; refusing the handshake closes it
        method: str = scope["method"].upper()
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        path = raw_path.decode("latin-1").split("?", 1)[0]
        if method == "GET" and path == "/openapi.json":
            await _respond(send, 200, self._openapi_bytes(), "application/json")
            return
        try:
            found = self.table.match(method, path)
        except PathDecodeError as exc:
            await _error(send, errors.from_rpc_error(invalid_argument(str(exc))))
            return
        if found is None:
            allowed = self.table.allowed_methods(path)
            err = errors.method_not_allowed(method, path, allowed) if allowed else errors.route_not_found(method, path)
            await _error(send, err)
            return
        route = found.route
        if route.client_streaming or route.raw_response_field:
            await _error(
                send,
                errors.from_status(
                    grpc.StatusCode.UNIMPLEMENTED, f"{route.qualified_name} is not served over HTTP yet; use gRPC"
                ),
            )
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            body = await _read_body(receive, MAX_JSON_BODY)
            request = mapping.decode_request(route, found.variables, scope.get("query_string", b""), body)
            if route.server_streaming:
                await self._stream(send, route, request, headers)
                return
            reply = await self.upstream.unary(route, request, headers)
        except RpcError as exc:
            await _error(send, errors.from_rpc_error(exc))
            return
        except grpc.RpcError as exc:
            await _error(send, errors.from_grpc_error(exc))
            return
        await _respond(send, 200, mapping.dumps(mapping.encode_response(route, reply)), "application/json")

    async def _stream(self, send: Send, route: Route, request: Message, headers: Mapping[str, str]) -> None:
        sse = "text/event-stream" in headers.get("accept", "")
        media = "text/event-stream" if sse else "application/x-ndjson"

        def frame(item: Any, event: str) -> bytes:
            return mapping.sse_event(item, event) if sse else mapping.ndjson_line(item)

        started = False
        try:
            async for reply in self.upstream.server_stream(route, request, headers):
                if not started:
                    # Until the first message an error is an ordinary HTTP error with its status.
                    await _start(send, 200, media)
                    started = True
                item = frame(mapping.stream_result(route, reply), "result")
                await send({"type": "http.response.body", "body": item, "more_body": True})
        except (RpcError, grpc.RpcError) as exc:
            err = errors.from_rpc_error(exc) if isinstance(exc, RpcError) else errors.from_grpc_error(exc)
            if not started:
                await _error(send, err)
                return
            # After the first message the status is already sent: the failure is the last item.
            await send({"type": "http.response.body", "body": frame({"error": err.body}, "error"), "more_body": True})
        if not started:
            await _start(send, 200, media)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _openapi_bytes(self) -> bytes:
        if self._openapi is None:
            if OPENAPI_FILE.exists():
                self._openapi = OPENAPI_FILE.read_bytes()
            else:
                from gateway_svc.openapi import build_document

                self._openapi = json.dumps(build_document(self.table)).encode("utf-8")
        return self._openapi


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RpcError(grpc.StatusCode.CANCELLED, "client went away")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise invalid_argument(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _start(send: Send, status: int, media: str, extra: Mapping[str, str] | None = None) -> None:
    headers = [(b"content-type", media.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _respond(send: Send, status: int, body: bytes, media: str, extra: Mapping[str, str] | None = None) -> None:
    await _start(send, status, media, extra)
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, err: errors.HttpError) -> None:
    await _respond(send, err.status, err.body_bytes(), "application/json", err.headers)
