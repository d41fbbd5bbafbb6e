"""The live desktop: a browser's WebSocket relayed to the VNC server inside an instance, and viewer URLs.

`GET /v1/instances/{id}/desktop:stream` with `Upgrade: websocket` carries RFB in binary frames
both ways, as websockify does, so noVNC connects to it directly. Admission, before the handshake
is accepted:

* the tenant's API key (`authorization` / `x-api-key`, or the subprotocol `cyberdesk.key.<key>`
  as for the WebSocket shell; a console session arrives as a key too), or a viewer token from
  CreateDesktopViewerUrl as the subprotocol `cyberdesk.viewer.<token>` (`desktop_links`);
* then the instance is resolved for that tenant as every call's is (another tenant's instance is
  404), and one `PortService.OpenPort` tunnel with `desktop` set is opened to its agent (the same
  tunnel previews use, `preview.Tunnel`), which starts x11vnc on first use (guest_agent/vnc.py).

View-only (a view-only token, or `?view_only=true` with a key) is enforced here, not in the
browser: the client's bytes go through `gateway_svc.rfb.ClientStream`, which drops input messages
and ends a stream it cannot parse. The server's bytes pass unchanged. Several viewers may watch
at once: each has its own tunnel and x11vnc serves them all (`-shared`).

A key's stream is tracked like every open call (`revocation.OpenCalls`) and ends when the key is
revoked; a token's stream outlives the token's expiry (expiry refuses new connections only).
Refused handshakes are HTTP errors with the usual Status body; a stream that ends after the
handshake closes with 1000 (the server closed), 1008 (the client broke RFB) or 4000 + the gRPC
code of the tunnel's failure. No token or key is ever logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import MutableMapping, Sequence
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from cyberdesk_common.metadata import agent_metadata, internal_metadata
from cyberdesk_common.status import RpcError, failed_precondition, invalid_argument
from cyberdesk_common.tracing import inject_metadata
from cyberdesk_proto.v1 import instance_pb2, instance_pb2_grpc, ports_pb2, ports_pb2_grpc
from gateway_svc.admission import Admission
from gateway_svc.auth import SCOPE_INSTANCES
from gateway_svc.rest import desktop_links, http_errors
from gateway_svc.rest.asgi import Receive, Scope, Send, request_headers
from gateway_svc.rest.cors import CorsPolicy
from gateway_svc.rest.preview import Access, AgentUnreachable, Tunnel
from gateway_svc.rest.preview_links import PreviewTarget, PreviewTokens, unauthenticated
from gateway_svc.rest.pty_relay import WS_KEY_PREFIX, reject_handshake
from gateway_svc.rest.upstream import credentials
from gateway_svc.revocation import OpenCalls
from gateway_svc.rfb import ClientStream, RfbViolation

_log = logging.getLogger("gateway_svc.desktop")

DESKTOP_VIEWER_SERVICE = "cyberdesk.v1.DesktopViewerService"
# Viewers of one instance at once, per gateway (CYBERDESK_DESKTOP_MAX_VIEWERS): each is a tunnel
# and a client of the instance's x11vnc, and a viewer token (unlike a key) is not rate limited.
# 64 were measured to be served (bench/desktop_stream.py).
MAX_VIEWERS_PER_INSTANCE = 64
_TRUE = frozenset({"1", "true", "yes"})


class Viewer:
    """An admitted viewer: who it is for, the agent's channel and metadata, and its mode."""

    def __init__(self, tenant_id: str, instance_id: str, view_only: bool, access: Access, by_key: bool) -> None:
        self.tenant_id, self.instance_id, self.view_only = tenant_id, instance_id, view_only
        self.access, self.by_key = access, by_key


class DesktopViewers:
    """Serves the desktop stream WebSocket and CreateDesktopViewerUrl, on the gateway's Admission."""

    def __init__(
        self,
        admission: Admission,
        tokens: PreviewTokens,
        public_url: str,
        open_calls: OpenCalls | None = None,
        cors: CorsPolicy | None = None,
        max_viewers: int = MAX_VIEWERS_PER_INSTANCE,
    ) -> None:
        self.admission = admission
        self.max_viewers = max_viewers
        self.tokens = tokens
        self.public_url = public_url
        self.open_calls = open_calls or OpenCalls()
        self.cors = cors or CorsPolicy()
        self.active = 0  # viewers connected now (bench, logs)
        self._per_instance: dict[str, int] = {}

    # -- admission ---------------------------------------------------------------------------------

    async def authorize(self, instance_id: str, headers: dict[str, str], offered: Sequence[str], query: str) -> Viewer:
        """Key or viewer token -> tenant -> the instance's agent; raises the precise RpcError."""
        token = desktop_links.token_from_subprotocols(list(offered))
        for proto in offered:
            if proto.startswith(WS_KEY_PREFIX) and "authorization" not in headers and "x-api-key" not in headers:
                headers["x-api-key"] = proto[len(WS_KEY_PREFIX) :]
        if token:
            grant = desktop_links.verify(self.tokens, token, time.time())
            if grant.instance_id != instance_id:
                raise unauthenticated("the viewer token is for another instance")
            tenant, view_only, by_key = grant.tenant_id, grant.view_only, False
        elif "authorization" in headers or "x-api-key" in headers:
            gate = self.admission.gate
            principal, pending = await gate.begin(credentials(headers), SCOPE_INSTANCES)
            await gate.finish(principal, pending)
            tenant, view_only, by_key = principal.tenant_id, _view_only_query(query), True
        else:
            raise unauthenticated(
                "the desktop stream needs the tenant's API key (authorization: Bearer <key>, x-api-key, or the "
                f"subprotocol {WS_KEY_PREFIX}<key>) or a viewer token from CreateDesktopViewerUrl (the subprotocol "
                f"{desktop_links.TOKEN_SUBPROTOCOL}<token>)"
            )
        routes = self.admission.routes
        route = await routes.resolve(tenant, instance_id, None)
        access = Access(
            channel=routes.channel(route),
            metadata=tuple(inject_metadata(list(agent_metadata(route.token)))),
            target=PreviewTarget(instance_id, 0, "", ""),
            drop=frozenset(),
            cookie=None,
            request_target="",
        )
        return Viewer(tenant, instance_id, view_only, access, by_key)

    # -- the WebSocket -----------------------------------------------------------------------------

    async def serve_websocket(self, scope: Scope, receive: Receive, send: Send, instance_id: str) -> None:
        """Admit the viewer, open the tunnel, accept the WebSocket and relay until either side ends."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        headers = request_headers(scope)
        if not self.cors.websocket_allowed(headers, scope.get("scheme", "ws")):
            origin = headers.get("origin")
            denied = RpcError(
                grpc.StatusCode.PERMISSION_DENIED, f"origin {origin} is not allowed (CYBERDESK_CORS_ORIGINS)"
            )
            await reject_handshake(scope, send, http_errors.from_rpc_error(denied))
            return
        offered: list[str] = list(scope.get("subprotocols") or [])
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            viewer = await self.authorize(instance_id, headers, offered, query)
            if self._per_instance.get(instance_id, 0) >= self.max_viewers:
                raise RpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"instance {instance_id} has {self.max_viewers} viewers already; close one first",
                )
            # Counted from here (before the tunnel is open), so that viewers arriving together
            # cannot pass the limit while their tunnels open.
            self._per_instance[instance_id] = self._per_instance.get(instance_id, 0) + 1
            try:
                tunnel = await Tunnel.open(viewer.access, b"", desktop=True)
            except BaseException:
                self._release(instance_id)
                raise
        except RpcError as exc:
            if isinstance(exc, AgentUnreachable):
                self.admission.routes.invalidate(instance_id)
            await reject_handshake(scope, send, http_errors.from_rpc_error(exc))
            return
        accept: dict[str, Any] = {"type": "websocket.accept"}
        if desktop_links.SELECTED_SUBPROTOCOL in offered:
            accept["subprotocol"] = desktop_links.SELECTED_SUBPROTOCOL
        relay = _Relay(tunnel, ClientStream(view_only=viewer.view_only), receive, send)
        self.active += 1
        _log.info(
            "desktop viewer connected",
            extra={
                "instance_id": instance_id,
                "view_only": viewer.view_only,
                "auth": "key" if viewer.by_key else "viewer token",
                "viewers": self.active,
            },
        )
        tracked = self.open_calls.track(credentials(headers)) if viewer.by_key else contextlib.nullcontext()
        try:
            await relay.send(accept)  # a client that left meanwhile makes the relay end at once
            async with tracked:
                await relay.run()
        except RpcError as exc:
            # The key was revoked while the viewer watched (revocation.OpenCalls ended the task).
            await relay.close(4000 + exc.code.value[0], exc.code.name)
        finally:
            tunnel.cancel()
            self.active -= 1
            self._release(instance_id)
            _log.info(
                "desktop viewer left",
                extra={
                    "instance_id": instance_id,
                    "passed": relay.stream.counts.passed,
                    "dropped": relay.stream.counts.dropped,
                    "reason": relay.reason,
                },
            )

    def _release(self, instance_id: str) -> None:
        left = self._per_instance.pop(instance_id, 1) - 1
        if left > 0:
            self._per_instance[instance_id] = left

    # -- CreateDesktopViewerUrl --------------------------------------------------------------------

    async def create_url(
        self, request: ports_pb2.CreateDesktopViewerUrlRequest, metadata: Sequence[tuple[str, str | bytes]]
    ) -> ports_pb2.CreateDesktopViewerUrlResponse:
        """Mint a viewer token for the desktop of one of the caller's instances."""
        gate = self.admission.gate
        principal, pending = await gate.begin(metadata, SCOPE_INSTANCES)
        await gate.finish(principal, pending)
        if not request.instance_id:
            raise invalid_argument("instance_id is required")
        ttl = float(desktop_links.DEFAULT_TTL_SECONDS)
        if request.HasField("ttl"):
            ttl = request.ttl.seconds + request.ttl.nanos / 1e9
            if not 0 < ttl <= desktop_links.MAX_TTL_SECONDS:
                raise invalid_argument(f"ttl must be more than 0 and at most 604800 s (7 days), got {ttl:g}")
        # The ownership check is instance_svc's, as for every InstanceService call.
        stub = instance_pb2_grpc.InstanceServiceStub(self.admission.instance_channel)
        try:
            reply = await stub.GetInstance(
                instance_pb2.GetInstanceRequest(instance_id=request.instance_id),
                metadata=internal_metadata(principal.tenant_id, self.admission.internal_token),
                timeout=10,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise RpcError(grpc.StatusCode.UNAVAILABLE, "the instance service is unreachable; retry") from None
            raise RpcError(err.code(), err.details() or "") from None
        if not reply.instance.desktop.enabled:
            raise failed_precondition(
                f"instance {request.instance_id} has no desktop; create it with desktop enabled to view it live"
            )
        expires = int(time.time() + ttl)
        grant = desktop_links.ViewerGrant(principal.tenant_id, request.instance_id, request.view_only, expires)
        token = desktop_links.mint(self.tokens, grant)
        url, stream_url = desktop_links.viewer_urls(self.public_url, request.instance_id, token)
        return ports_pb2.CreateDesktopViewerUrlResponse(
            url=url,
            stream_url=stream_url,
            token=token,
            expire_time=timestamp_pb2.Timestamp(seconds=expires),
            view_only=request.view_only,
        )


def _view_only_query(query: str) -> bool:
    from urllib.parse import parse_qsl

    return any(name == "view_only" and value.lower() in _TRUE for name, value in parse_qsl(query))


class _Relay:
    """One accepted viewer: the tunnel's bytes to the socket as binary frames, the socket's through the parser.

    Two tasks: `run` reads the tunnel and sends frames; `_inbound` reads the socket, passes each
    binary message through `stream` and writes what it returns to the tunnel. Sends go through one
    lock so that a close never interleaves with a frame; once the socket is closed nothing is sent.
    """

    def __init__(self, tunnel: Tunnel, stream: ClientStream, receive: Receive, send: Send) -> None:
        self.tunnel, self.stream = tunnel, stream
        self.receive, self._send = receive, send
        self._lock = asyncio.Lock()
        self.closed = False
        self.reason = ""

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if self.closed:
            return
        async with self._lock:
            try:
                await self._send(message)
            except (OSError, RuntimeError):
                self.closed = True

    async def close(self, code: int, reason: str) -> None:
        self.reason = self.reason or reason
        await self.send({"type": "websocket.close", "code": code, "reason": reason[:120]})
        self.closed = True

    async def run(self) -> None:
        inbound = asyncio.create_task(self._inbound())
        try:
            async for data in self.tunnel.responses():
                if not data:
                    break  # the server closed its side: the session is over
                await self.send({"type": "websocket.send", "bytes": data})
                if self.closed:
                    return
            await self.close(1000, "the desktop's VNC server closed the connection")
        except RpcError as exc:
            await self.close(4000 + exc.code.value[0], exc.message)
        finally:
            inbound.cancel()
            with contextlib.suppress(asyncio.CancelledError, RpcError):
                await inbound

    async def _inbound(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                self.reason = self.reason or "the viewer left"
                self.closed = True
                self.tunnel.cancel()
                return
            data = message.get("bytes")
            if data is None:
                await self.close(1003, "send RFB in binary frames")
                self.tunnel.cancel()
                return
            try:
                out = self.stream.feed(data)
            except RfbViolation as exc:
                await self.close(1008, str(exc))
                self.tunnel.cancel()
                return
            if out:
                await self.tunnel.write(out)


class DesktopViewerServicer(ports_pb2_grpc.DesktopViewerServiceServicer):
    """Serves cyberdesk.v1.DesktopViewerService on the gateway's gRPC port (the gateway holds the secret)."""

    def __init__(self, viewers: DesktopViewers) -> None:
        self._viewers = viewers

    async def CreateDesktopViewerUrl(
        self,
        request: ports_pb2.CreateDesktopViewerUrlRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> ports_pb2.CreateDesktopViewerUrlResponse:
        """A viewer URL and signed token for the desktop of one of the caller's instances."""
        metadata = [(k, v) for k, v in context.invocation_metadata() or ()]
        return await self._viewers.create_url(request, metadata)
