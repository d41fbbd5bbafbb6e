"""The ASGI app of the REST face: matches a request to its HTTP binding and dispatches it by kind.

The app does no auth, rate limiting or routing itself: it calls an injected `upstream.Upstream`,
which the gateway wires (`upstream.GatewayUpstream`) to the same admission code as its gRPC path
and hands the HTTP headers to (as gRPC metadata would be). What it dispatches to:

- unary bindings: a JSON body / query / path in, JSON out (here);
- server streams as NDJSON or Server-Sent Events, client streams as NDJSON (`streams`);
- file download with Range and sha256 (`downloads`, planned by `ranges`);
- file upload of a raw body (`uploads`);
- bidirectional streams (ConnectPty) over WebSocket (`pty_relay`, frames in `control_frames`);
- `GET /openapi.json`: the committed document (`openapi` builds it);
- CORS for browsers on other origins (`cors`): preflights answered, allowed origins' responses
  marked readable, WebSocket handshakes from other origins refused;
- the live desktop (`desktop_stream`): its WebSocket `/v1/instances/{id}/desktop:stream`, the
  viewer page `/desktop/{id}` and its files (`desktop_page`), and CreateDesktopViewerUrl;
- previews of ports inside instances, by host or by `/v1/instances/{id}/ports/{port}/` (matched
  first), and CreatePreviewUrl, which the gateway serves itself (`preview`);
- key management (`/v1/keys`, AuthService), which the gateway serves itself too: the call goes to
  its own AuthServicer with the caller's credential headers as metadata, so the admin scope is
  checked by the same code as over gRPC;
- the web console: its files at `/` and `/assets/` (`console_static`), sign-in at
  `/console/session` (`console_session`), and its session cookie on every other request and
  WebSocket handshake (`gateway_svc.sessions`: the cookie becomes the session's key, after the
  same-origin and CSRF checks), so every route accepts a signed-in console as it accepts a key.

Every body is read incrementally; no file is ever held whole in memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from cyberdesk_common.status import RpcError, invalid_argument
from gateway_svc.keys_api import AUTH_SERVICE, AuthServicer
from gateway_svc.rest import cors as cors_rules
from gateway_svc.rest import downloads, http_errors, json_mapping, pty_relay, streams, uploads
from gateway_svc.rest.asgi import (
    MAX_JSON_BODY,
    Receive,
    ResponseAborted,
    Scope,
    Send,
    read_body,
    request_headers,
    request_path,
    respond,
    respond_error,
    respond_message,
    serve_lifespan,
    until_disconnect,
)
from gateway_svc.rest.console_session import SESSION_PATH, serve_session
from gateway_svc.rest.console_static import ConsoleFiles
from gateway_svc.rest.cors import CorsPolicy
from gateway_svc.rest.desktop_links import match_stream, token_from_subprotocols
from gateway_svc.rest.desktop_page import DesktopPages
from gateway_svc.rest.desktop_stream import DESKTOP_VIEWER_SERVICE, DesktopViewers
from gateway_svc.rest.http_bindings import BindingTable, build_binding_table
from gateway_svc.rest.path_templates import PathDecodeError
from gateway_svc.rest.preview import PREVIEW_SERVICE, Previews
from gateway_svc.rest.upstream import Upstream, credentials
from gateway_svc.sessions import Sessions

_log = logging.getLogger("gateway_svc.rest")

OPENAPI_FILE = Path(__file__).resolve().parents[2] / "openapi" / "cyberdesk.v1.openapi.json"


class RestApp:
    """The ASGI application: `RestApp(upstream)` (binding table of cyberdesk.v1 by default)."""

    def __init__(
        self,
        upstream: Upstream,
        table: BindingTable | None = None,
        previews: Previews | None = None,
        keys: AuthServicer | None = None,
        cors: CorsPolicy | None = None,
        desktop: DesktopViewers | None = None,
        sessions: Sessions | None = None,
        console: ConsoleFiles | None = None,
    ) -> None:
        self.upstream = upstream
        self.table = table or build_binding_table()
        self.previews = previews  # ports inside instances (`preview`); None: no previews, e.g. in unit tests
        self.keys = keys  # key management (`keys_api`); None: its routes are UNIMPLEMENTED
        self.cors = cors or CorsPolicy()  # default: no origin allowed, no CORS header sent
        self.desktop = desktop  # the live desktop's stream and viewer URLs; None: not served
        self.desktop_pages = DesktopPages()
        self.sessions = sessions  # console sign-in by cookie (`gateway_svc.sessions`); None: keys only
        self.console = console  # the console's files; None: not served
        self._openapi: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
        elif scope["type"] == "websocket":
            stream_of = match_stream(request_path(scope)) if self.desktop is not None else None
            # A viewer token is a credential of its own: a stale console cookie beside it must not
            # refuse the link (the stream prefers the token over any key anyway).
            by_token = stream_of is not None and bool(token_from_subprotocols(list(scope.get("subprotocols") or [])))
            if self.sessions is not None and not by_token:
                connect = await receive()
                try:
                    scope = await self.sessions.admit_scope(scope)
                except RpcError as exc:
                    await pty_relay.reject_handshake(scope, send, http_errors.from_rpc_error(exc))
                    return
                receive = _replaying(connect, receive)
            if stream_of is not None and self.desktop is not None:
                await self.desktop.serve_websocket(scope, receive, send, stream_of)
                return
            await pty_relay.serve_pty_websocket(self.upstream, self.table, scope, receive, send, self.cors)
        elif scope["type"] == "http":
            await self._serve_http(scope, receive, send)

    async def _serve_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"].upper()
        path = request_path(scope)
        if self.previews is not None:
            # A preview host takes every path, so it is matched before any route of the API.
            target = self.previews.match(request_headers(scope), path)
            if target is not None:
                await self.previews.serve_http(scope, receive, send, target)
                return
        if self.console is not None and self.console.matches(method, path):
            await self.console.serve(scope, send)
            return
        if self.sessions is not None and path == SESSION_PATH:
            await serve_session(self.sessions, scope, receive, send)
            return
        if self.desktop_pages.matches(method, path):
            await self.desktop_pages.serve(scope, send)
            return
        headers = request_headers(scope)
        if cors_rules.is_preflight(method, headers):
            await self._preflight(send, headers)
            return
        origin = headers.get("origin")
        if origin and self.cors.enabled:
            send = _adding_headers(send, self.cors.response_headers(origin))
        if method in ("GET", "HEAD") and path == "/openapi.json":
            await respond(send, 200, self._openapi_bytes(), "application/json")
            return
        if self.sessions is not None:
            try:
                scope = await self.sessions.admit_scope(scope)
            except RpcError as exc:
                await respond_error(send, http_errors.from_rpc_error(exc))
                return
            headers = request_headers(scope)
        try:
            found = self.table.match(method, path)
        except PathDecodeError as exc:
            await respond_error(send, http_errors.from_rpc_error(invalid_argument(str(exc))))
            return
        if found is None:
            allowed = self.table.allowed_methods(path)
            err = (
                http_errors.method_not_allowed(method, path, allowed)
                if allowed
                else http_errors.route_not_found(method, path)
            )
            await respond_error(send, err)
            return
        binding = found.binding
        query: bytes = scope.get("query_string", b"")
        upstream = self.upstream
        try:
            if binding.websocket:
                await respond_error(send, pty_relay.upgrade_required(binding))
                return
            if binding.raw_request_field:
                await uploads.upload_raw_body(upstream, receive, send, binding, found.variables, query, headers)
                return
            if binding.client_streaming:
                await streams.call_with_ndjson_body(upstream, receive, send, binding, found.variables, query, headers)
                return
            body = await read_body(receive, MAX_JSON_BODY)
            request = json_mapping.decode_request(binding, found.variables, query, body)
            if binding.raw_response_field:
                head = method == "HEAD"
                await until_disconnect(
                    receive, downloads.serve_download(upstream, send, binding, request, headers, head)
                )
                return
            if binding.server_streaming:
                await until_disconnect(receive, streams.stream_responses(upstream, send, binding, request, headers))
                return
            reply: Message | None
            if binding.service == PREVIEW_SERVICE and self.previews is not None:
                reply = await self.previews.create_url(request, credentials(headers))  # type: ignore[arg-type]
            elif binding.service == DESKTOP_VIEWER_SERVICE and self.desktop is not None:
                reply = await self.desktop.create_url(request, credentials(headers))  # type: ignore[arg-type]
            elif binding.service == AUTH_SERVICE:
                # Never forwarded: admission would refuse a service it does not route.
                if self.keys is None:
                    raise RpcError(grpc.StatusCode.UNIMPLEMENTED, "key management is not served here")
                reply = await self.keys.call(binding.method, request, credentials(headers))
            else:
                # Cancelled with the client's disconnect, as over gRPC: an abandoned RunProcess must
                # not run on to its end (its process is killed with the call).
                reply = await until_disconnect(receive, upstream.unary(binding, request, headers))
            if reply is None:
                return  # the client left; nobody to answer
        except RpcError as exc:
            await respond_error(send, http_errors.from_rpc_error(exc))
            return
        except grpc.RpcError as exc:
            await respond_error(send, http_errors.from_grpc_error(exc))
            return
        except ResponseAborted as exc:
            # Returning without completing the response makes the server drop the connection, so
            # the client sees a short body (its Content-Length is not met), never a wrong one.
            _log.warning("response aborted", extra={"route": binding.qualified_name, "reason": str(exc)})
            return
        await respond_message(send, binding, reply)

    async def _preflight(self, send: Send, headers: dict[str, str]) -> None:
        allowed = self.cors.preflight_headers(headers.get("origin"))
        if allowed is None:
            # No CORS header: the browser fails the request it asked about. The body is for a
            # person reading the exchange in the browser's network panel.
            err = http_errors.from_status(
                grpc.StatusCode.PERMISSION_DENIED,
                f"origin {headers.get('origin')} is not allowed (CYBERDESK_CORS_ORIGINS)",
            )
            await respond_error(send, err)
            return
        await send({"type": "http.response.start", "status": 204, "headers": allowed})
        await send({"type": "http.response.body", "body": b""})

    def _openapi_bytes(self) -> bytes:
        if self._openapi is None:
            if OPENAPI_FILE.exists():
                self._openapi = OPENAPI_FILE.read_bytes()
            else:
                from gateway_svc.rest.openapi import build_document

                self._openapi = json.dumps(build_document(self.table)).encode("utf-8")
        return self._openapi


def _replaying(first: MutableMapping[str, Any], receive: Receive) -> Receive:
    """`receive` that hands out `first` (a message already taken) once before the rest."""
    pending = [first]

    async def receiving() -> MutableMapping[str, Any]:
        return pending.pop() if pending else await receive()

    return receiving


def _adding_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """`send` with `extra` headers added to the response's start."""
    if not extra:
        return send

    async def sending(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending
