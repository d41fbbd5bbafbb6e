"""Previews: HTTP/1.1 and WebSocket to a TCP port inside an instance, through the instance's guest agent.

A request names a preview by its host (`<port>-<instance_id>.<preview domain>`, every path) or by
its path (`/v1/instances/<instance_id>/ports/<port>/...`); see `preview_links`. Access is the
tenant's API key (`authorization` / `x-api-key`, consumed here and never forwarded) or a signed
preview token from CreatePreviewUrl (`x-cyberdesk-preview-token` header; a public token also as
the `cyberdesk_preview_token` query parameter, which sets a cookie of the same name so the page's
own requests get in too). Then the instance is resolved for the caller's tenant exactly as
Admission does (another tenant's instance is 404) and one `PortService.OpenPort` tunnel is opened
to the instance's agent for the request.

Why the HTTP side is relayed as bytes through h11 rather than re-implemented: the ASGI server has
parsed the client's request already, so the gateway re-frames it with h11 (request line rewritten
for the path form, Host set to `localhost:<port>`, body chunks sent as they arrive, chunked when the
client's was) and parses the service's response with h11, handing every body chunk on at once:
streamed responses are never buffered, and HTTP framing rules (HEAD, 204, read-until-close of an
HTTP/1.0 server) are h11's, not ours. A WebSocket upgrade cannot pass through ASGI as bytes (the
server would do the handshake and re-frame messages), so `websocket_protocol` is uvicorn's
WebSocket protocol class wrapped: an upgrade that names a preview is taken over at the transport
level, its handshake request forwarded, and from then on the socket's bytes are relayed unchanged
both ways (the 101 answer included); every other upgrade (the PTY) goes to uvicorn's own class.

Errors are the usual Status JSON: no key or token 401, a bad or expired token 401, another
tenant's instance 404, nothing listening on the port 502 naming the port, a service that breaks
HTTP 502. No error carries the agent's address or any host path.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import grpc
import h11
from google.protobuf import timestamp_pb2

from cyberdesk_common.metadata import agent_metadata, internal_metadata
from cyberdesk_common.status import RpcError, invalid_argument
from cyberdesk_common.tracing import inject_metadata
from cyberdesk_proto.agent.v1 import agent_pb2
from cyberdesk_proto.v1 import instance_pb2, instance_pb2_grpc, ports_pb2, ports_pb2_grpc
from gateway_svc.admission import Admission
from gateway_svc.auth import SCOPE_INSTANCES
from gateway_svc.keystore import KEY_PREFIX
from gateway_svc.rest import http_errors
from gateway_svc.rest.asgi import Receive, Scope, Send, respond_error
from gateway_svc.rest.preview_links import (
    DEFAULT_TTL_SECONDS,
    MAX_TTL_SECONDS,
    TOKEN_COOKIE,
    TOKEN_HEADER,
    PreviewGrant,
    PreviewTarget,
    PreviewTokens,
    cookie_token,
    match,
    preview_urls,
    split_token_query,
    unauthenticated,
    upstream_headers,
)
from gateway_svc.rest.upstream import credentials
from gateway_svc.sessions import PREVIEW_PATH_FORM_CSP, without_session_cookie

_log = logging.getLogger("gateway_svc.preview")

PREVIEW_SERVICE = "cyberdesk.v1.PreviewService"
OPEN_PORT = "/cyberdesk.agent.v1.PortService/OpenPort"
# Response headers that describe the service's connection to the gateway, not the response.
_RESPONSE_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"proxy-connection"})
# The ASGI server answers `Expect: 100-continue` itself; the service must not answer it again.
_ALWAYS_DROPPED = frozenset({TOKEN_HEADER, "expect"})
_COALESCE = 1024 * 1024  # request body bytes joined into one tunnel message at most


def _serialize(message: agent_pb2.OpenPortRequest) -> bytes:
    return message.SerializeToString()


class AgentUnreachable(RpcError):
    """The tunnel's transport failed: the instance's agent does not answer (its route is stale)."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, f"the agent of instance {instance_id} is unreachable")


@dataclass(frozen=True)
class Access:
    """An admitted preview request: the agent's channel and metadata, and what to send the service."""

    channel: grpc.aio.Channel
    metadata: tuple[tuple[str, Any], ...]
    target: PreviewTarget
    drop: frozenset[str]  # request headers the gateway consumed (credentials)
    cookie: str | None  # the Cookie header without the preview cookie (None: unchanged)
    request_target: str  # path and query the service sees (token parameter removed)
    set_cookie: str = ""  # a Set-Cookie value for the response (a public token came in the query)


class Tunnel:
    """One OpenPort call: bytes in, bytes out (b"" once the service closed its sending side)."""

    def __init__(self, call: Any, instance_id: str, port: int) -> None:
        self._call = call
        self.instance_id, self.port = instance_id, port

    @classmethod
    async def open(cls, access: Access, first: bytes, *, desktop: bool = False) -> Tunnel:
        """Open the tunnel with `first` bytes on their way, and wait until the agent connected to the port.

        `desktop`: to the instance's VNC server instead of the target's port (the live desktop, desktop_stream).
        """
        factory: Any = access.channel.stream_stream(OPEN_PORT, _serialize, agent_pb2.OpenPortResponse.FromString)
        call = factory(metadata=access.metadata)
        tunnel = cls(call, access.target.instance_id, access.target.port)
        target = access.target
        try:
            await call.write(
                agent_pb2.OpenPortRequest(instance_id=target.instance_id, port=target.port, data=first, desktop=desktop)
            )
            reply: Any = await call.read()
        except grpc.aio.AioRpcError as err:
            call.cancel()
            raise tunnel.error(err) from None
        except asyncio.InvalidStateError:
            call.cancel()
            raise tunnel.error(None, await call.code(), await call.details()) from None
        if reply is grpc.aio.EOF or not reply.connected:  # type: ignore[attr-defined]
            call.cancel()
            raise tunnel.error(None, await call.code(), await call.details())
        return tunnel

    def error(
        self, err: grpc.aio.AioRpcError | None, code: grpc.StatusCode | None = None, details: str | None = None
    ) -> RpcError:
        """The caller's view of a failed tunnel: the agent's own words about the port, never its address."""
        if err is not None:
            code, details = err.code(), err.details()
        details = details or ""
        if code is grpc.StatusCode.UNAVAILABLE and details.startswith(
            (f"nothing listens on port {self.port}", f"the service on port {self.port}")
        ):
            return RpcError(code, details)
        if code is grpc.StatusCode.CANCELLED:
            return RpcError(code, "the preview request was cancelled")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, None):
            # A transport failure: its details name the agent's socket, which a tenant never sees.
            return AgentUnreachable(self.instance_id)
        return RpcError(code or grpc.StatusCode.UNKNOWN, details)

    async def write(self, data: bytes) -> None:
        """Bytes for the service (waits for flow control)."""
        try:
            await self._call.write(agent_pb2.OpenPortRequest(data=data))
        except grpc.aio.AioRpcError as err:
            raise self.error(err) from None
        except asyncio.InvalidStateError:
            raise self.error(None, await self._call.code(), await self._call.details()) from None

    async def done_writing(self) -> None:
        """Half-close: the service reads EOF."""
        with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
            await self._call.done_writing()

    async def responses(self) -> AsyncGenerator[bytes, None]:
        """The service's bytes; b"" once it closed its sending side; ends when the tunnel does."""
        while True:
            # read(), not `async for`: grpc.aio forbids mixing the iterator with write() on one call.
            try:
                reply: Any = await self._call.read()
            except grpc.aio.AioRpcError as err:
                raise self.error(err) from None
            if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
                code = await self._call.code()
                if code is not grpc.StatusCode.OK:
                    raise self.error(None, code, await self._call.details())
                return
            if reply.data:
                yield reply.data
            if reply.eof:
                yield b""

    def cancel(self) -> None:
        """Close the connection to the service."""
        self._call.cancel()


class Previews:
    """Serves previews (HTTP and WebSocket) and CreatePreviewUrl, on the gateway's Admission."""

    def __init__(self, admission: Admission, tokens: PreviewTokens, domain: str, public_url: str) -> None:
        self.admission = admission
        self.tokens = tokens
        self.domain = domain
        self.public_url = public_url
        self.pool = TunnelPool()

    # -- which requests are previews -------------------------------------------------------------

    def match(self, headers: Mapping[str, str], raw_path: str) -> PreviewTarget | None:
        """The preview a request names by its Host or path (query not included), or None."""
        return match(headers.get("host", ""), raw_path, "", self.domain)

    # -- access ------------------------------------------------------------------------------------

    async def authorize(self, target: PreviewTarget, headers: Mapping[str, str], query: str) -> Access:
        """Key or token -> tenant -> the instance's agent; raises the precise RpcError."""
        query_token, query = split_token_query(query)
        cookie_value, cookie_rest = cookie_token(headers.get("cookie", ""))
        # The console's session cookie is the gateway's: the service in the instance never sees it.
        cookie_rest, had_session = without_session_cookie(cookie_rest)
        header_token = headers.get(TOKEN_HEADER, "")
        token = header_token or query_token or cookie_value
        drop = set(_ALWAYS_DROPPED)
        set_cookie = ""
        if token:
            grant = self.tokens.verify(token, time.time())
            if not header_token and not grant.public:
                raise unauthenticated(f"this preview token is not public: send it in the {TOKEN_HEADER} header")
            if grant.instance_id != target.instance_id or grant.port != target.port:
                raise unauthenticated("the preview token is for another instance or port")
            tenant = grant.tenant_id
            # The request's own Authorization is the app's (basic auth, its bearer tokens) and goes
            # through, unless it is one of our keys; x-api-key is never an app's header.
            drop.add("x-api-key")
            if headers.get("authorization", "").startswith("Bearer " + KEY_PREFIX):
                drop.add("authorization")
            if query_token:
                path = target.path_prefix + "/" if target.path_prefix else "/"
                max_age = max(0, int(grant.expires - time.time()))
                set_cookie = f"{TOKEN_COOKIE}={query_token}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Lax"
        elif "authorization" in headers or "x-api-key" in headers:
            gate = self.admission.gate
            principal, pending = await gate.begin(credentials(headers), SCOPE_INSTANCES)
            await gate.finish(principal, pending)
            tenant = principal.tenant_id
            drop |= {"authorization", "x-api-key"}
        else:
            raise unauthenticated(
                "a preview needs the tenant's API key (authorization: Bearer <key> or x-api-key) "
                f"or a preview token from CreatePreviewUrl ({TOKEN_HEADER} header)"
            )
        routes = self.admission.routes
        route = await routes.resolve(tenant, target.instance_id, None)
        path, _, _ = target.target.partition("?")
        return Access(
            channel=routes.channel(route),
            metadata=tuple(inject_metadata(list(agent_metadata(route.token)))),
            target=target,
            drop=frozenset(drop),
            cookie=cookie_rest if cookie_value or had_session else None,
            request_target=f"{path}?{query}" if query else path,
            set_cookie=set_cookie,
        )

    def _unreachable(self, exc: RpcError, target: PreviewTarget) -> None:
        """Forget the route of an instance whose agent could not be reached, as Admission does."""
        if isinstance(exc, AgentUnreachable):
            self.admission.routes.invalidate(target.instance_id)

    def _forwarded(self, scope: Scope, headers: Mapping[str, str], target: PreviewTarget) -> dict[str, str]:
        client = scope.get("client")
        return {
            "x-forwarded-host": headers.get("host", ""),
            "x-forwarded-proto": str(scope.get("scheme", "http")).replace("ws", "http"),
            "x-forwarded-for": client[0] if client else "",
            "x-forwarded-prefix": target.path_prefix,
        }

    # -- HTTP --------------------------------------------------------------------------------------

    async def serve_http(self, scope: Scope, receive: Receive, send: Send, target: PreviewTarget) -> None:
        """Relay one HTTP request to the port and its response back, both streamed."""
        headers = _header_dict(scope)
        try:
            access = await self.authorize(target, headers, scope.get("query_string", b"").decode("latin-1"))
        except RpcError as exc:
            await respond_error(send, http_errors.from_rpc_error(exc))
            return
        request_headers = upstream_headers(
            list(scope.get("headers", [])),
            target.port,
            drop=access.drop,
            cookie=access.cookie,
            forwarded=self._forwarded(scope, headers, target),
        )
        request = h11.Request(method=scope["method"], target=access.request_target.encode(), headers=request_headers)
        # A request without a body can be sent again, so it may take a pooled tunnel: if the service
        # closed that keep-alive connection meanwhile, nothing was answered and a fresh one is used.
        bodyless = "content-length" not in headers and "transfer-encoding" not in headers
        key = (access.target.instance_id, access.target.port, id(access.channel))
        pooled = self.pool.take(key) if bodyless else None
        while True:
            conn = pooled[1] if pooled else h11.Connection(h11.CLIENT)
            try:
                head = conn.send(request) or b""
                if bodyless:
                    head += conn.send(h11.EndOfMessage()) or b""
            except h11.LocalProtocolError as exc:
                if pooled:
                    pooled[0].cancel()
                error = invalid_argument(f"bad request for a preview: {exc}")
                await respond_error(send, http_errors.from_rpc_error(error))
                return
            try:
                if pooled:
                    tunnel = pooled[0]
                    await tunnel.write(head)
                else:
                    tunnel = await Tunnel.open(access, head)
            except RpcError as exc:
                if pooled:
                    pooled[0].cancel()
                    pooled = None
                    continue
                self._unreachable(exc, target)
                await respond_error(send, _bad_gateway(exc))
                return
            relay = _HttpRelay(conn, tunnel, receive, send, access, reused=pooled is not None, body=not bodyless)
            outcome = await relay.run()
            if outcome is _Outcome.STALE:
                tunnel.cancel()
                pooled = None
                continue
            if outcome is _Outcome.REUSABLE:
                conn.start_next_cycle()
                self.pool.put(key, tunnel, conn)
            else:
                tunnel.cancel()
            return

    # -- CreatePreviewUrl --------------------------------------------------------------------------

    async def create_url(
        self, request: ports_pb2.CreatePreviewUrlRequest, metadata: Sequence[tuple[str, str | bytes]]
    ) -> ports_pb2.CreatePreviewUrlResponse:
        """Mint a token for a port of one of the caller's instances (which must exist for its tenant)."""
        gate = self.admission.gate
        principal, pending = await gate.begin(metadata, SCOPE_INSTANCES)
        await gate.finish(principal, pending)
        if not request.instance_id:
            raise invalid_argument("instance_id is required")
        if not 1 <= request.port <= 65535:
            raise invalid_argument(f"port must be 1 to 65535, got {request.port}")
        ttl = float(DEFAULT_TTL_SECONDS)
        if request.HasField("ttl"):
            ttl = request.ttl.seconds + request.ttl.nanos / 1e9
            if not 0 < ttl <= MAX_TTL_SECONDS:
                raise invalid_argument(f"ttl must be more than 0 and at most {MAX_TTL_SECONDS} s (7 days), got {ttl:g}")
        # The ownership check is instance_svc's, as for every InstanceService call.
        stub = instance_pb2_grpc.InstanceServiceStub(self.admission.instance_channel)
        try:
            await stub.GetInstance(
                instance_pb2.GetInstanceRequest(instance_id=request.instance_id),
                metadata=internal_metadata(principal.tenant_id, self.admission.internal_token),
                timeout=10,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise RpcError(grpc.StatusCode.UNAVAILABLE, "the instance service is unreachable; retry") from None
            raise RpcError(err.code(), err.details() or "") from None
        expires = int(time.time() + ttl)
        grant = PreviewGrant(principal.tenant_id, request.instance_id, request.port, expires, request.public)
        token = self.tokens.mint(grant)
        url, path_url = preview_urls(
            self.public_url, self.domain, request.instance_id, request.port, token if request.public else None
        )
        return ports_pb2.CreatePreviewUrlResponse(
            url=url, path_url=path_url, token=token, expire_time=timestamp_pb2.Timestamp(seconds=expires)
        )


def _header_dict(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _bad_gateway(exc: RpcError) -> http_errors.HttpError:
    """502 for a tunnel that could not reach the service (the Status body keeps its gRPC code)."""
    err = http_errors.from_rpc_error(exc)
    if exc.code is grpc.StatusCode.UNAVAILABLE:
        return http_errors.HttpError(502, err.body, err.headers)
    return err


class _Outcome(enum.Enum):
    """How one exchange through a tunnel ended."""

    REUSABLE = "the response is complete and both sides keep the connection"
    DONE = "finished (answered or failed); the tunnel is not reused"
    STALE = "a pooled tunnel whose service had closed it: nothing was answered, send again"


class _HttpRelay:
    """One request/response through a tunnel.

    Two tasks: `run` parses the service's bytes and sends the response; `_pump` sends the client's
    body as it arrives (when there is one), then waits for the client's disconnect. The h11
    connection is shared, but h11 calls never await, so the tasks never interleave inside one. A
    client that leaves cancels the tunnel (the service sees its connection close).
    """

    def __init__(
        self,
        conn: h11.Connection,
        tunnel: Tunnel,
        receive: Receive,
        send: Send,
        access: Access,
        *,
        reused: bool,
        body: bool,
    ) -> None:
        self.conn, self.tunnel, self.receive, self.send, self.access = conn, tunnel, receive, send, access
        self.reused, self.body = reused, body
        self.started = False
        self.answered = False  # any byte of the service's answer arrived
        self.client_left = False

    async def run(self) -> _Outcome:
        pump = asyncio.create_task(self._pump())
        try:
            complete = await self._responses()
            if complete and self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                return _Outcome.REUSABLE
            return _Outcome.DONE
        except RpcError as exc:
            if self.client_left:
                return _Outcome.DONE
            if self.reused and not self.answered:
                return _Outcome.STALE
            if not self.started:
                await respond_error(self.send, _bad_gateway(exc))
            else:
                # Too late for a status: returning with the response incomplete makes the server
                # drop the connection, so the client sees a short body, never a complete-looking one.
                _log.warning("preview response cut off", extra={"port": self.tunnel.port, "reason": exc.message})
            return _Outcome.DONE
        except asyncio.CancelledError:
            if not self.client_left:
                self.tunnel.cancel()
                raise
            return _Outcome.DONE
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, RpcError, OSError):
                await pump

    def _fail(self, message: str) -> RpcError:
        return RpcError(grpc.StatusCode.UNAVAILABLE, f"the service on port {self.tunnel.port} {message}")

    async def _responses(self) -> bool:
        """Relay the response; True once it is complete with the tunnel still open (reusable)."""
        async with contextlib.aclosing(self.tunnel.responses()) as replies:
            async for data in replies:
                self.answered = self.answered or bool(data)
                self.conn.receive_data(data)
                if await self._events():
                    return bool(data)  # b"": the service closed its side, the tunnel is spent
        self.conn.receive_data(b"")  # the tunnel ended: a read-until-close body ends here
        if not await self._events():
            raise self._fail("closed the connection before its response was complete")
        return False

    async def _events(self) -> bool:
        """Hand on every parsed event; True once the response is complete."""
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._fail(f"sent a response that is not valid HTTP/1.1 ({exc})") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return False
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue: the ASGI server spoke for the service already
            if isinstance(event, h11.Response):
                headers = [(k, v) for k, v in event.headers if k not in _RESPONSE_HOP_BY_HOP]  # names lower-cased
                if self.access.set_cookie:
                    headers.append((b"set-cookie", self.access.set_cookie.encode("latin-1")))
                if self.access.target.path_prefix:
                    headers.append((b"content-security-policy", PREVIEW_PATH_FORM_CSP.encode()))
                await self.send({"type": "http.response.start", "status": event.status_code, "headers": headers})
                self.started = True
            elif isinstance(event, h11.Data):
                await self.send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, h11.EndOfMessage):
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})
                return True
            elif isinstance(event, h11.ConnectionClosed):
                return False

    async def _pump(self) -> None:
        if self.body:
            # Reading the client and writing the tunnel overlap: a writer task sends what is queued,
            # joined into one message of up to _COALESCE bytes, while the next pieces are read (the
            # ASGI server hands a body on in pieces of at most 64 KiB). The queue is bounded, so a
            # slow service still pushes back on the client.
            queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
            writer = asyncio.create_task(self._write_body(queue))
            try:
                more = True
                while more:
                    message = await self.receive()
                    if message["type"] == "http.disconnect":
                        self._client_gone()
                        return
                    chunk: bytes = message.get("body", b"")
                    more = bool(message.get("more_body", False))
                    out = b""
                    if self.conn.our_state is h11.SEND_BODY:
                        if chunk:
                            out += self.conn.send(h11.Data(data=chunk)) or b""
                        if not more:
                            out += self.conn.send(h11.EndOfMessage()) or b""
                    if out:
                        await queue.put(out)
                await queue.put(None)
                await writer
            finally:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self._client_gone()

    async def _write_body(self, queue: asyncio.Queue[bytes | None]) -> None:
        done = False
        while not done:
            pieces = [await queue.get()]
            size = len(pieces[0] or b"")
            while not queue.empty() and size < _COALESCE and pieces[-1] is not None:
                pieces.append(queue.get_nowait())
                size += len(pieces[-1] or b"")
            done = pieces[-1] is None
            data = b"".join(p for p in pieces if p)
            if data:
                await self.tunnel.write(data)

    def _client_gone(self) -> None:
        self.client_left = True
        self.tunnel.cancel()


class TunnelPool:
    """Idle keep-alive tunnels per (instance, port, agent channel), newest first, closed after `idle_seconds`.

    A tunnel is pooled only after an exchange both sides completed with keep-alive, and taken only
    by a request already admitted for the same instance and port, so a pooled connection never
    serves another tenant. Bounded per port and in ports; the least recently used port goes first.
    """

    def __init__(self, per_port: int = 16, max_ports: int = 1024, idle_seconds: float = 4.0) -> None:
        self._idle: OrderedDict[tuple[str, int, int], list[tuple[float, Tunnel, h11.Connection]]] = OrderedDict()
        self.per_port, self.max_ports, self.idle_seconds = per_port, max_ports, idle_seconds

    def take(self, key: tuple[str, int, int]) -> tuple[Tunnel, h11.Connection] | None:
        """An idle tunnel of `key` (its h11 connection ready for the next request), or None."""
        entries = self._idle.get(key)
        now = time.monotonic()
        while entries:
            since, tunnel, conn = entries.pop()
            if now - since < self.idle_seconds:
                return tunnel, conn
            tunnel.cancel()
        return None

    def put(self, key: tuple[str, int, int], tunnel: Tunnel, conn: h11.Connection) -> None:
        """Keep a tunnel for the next request of `key`."""
        entries = self._idle.setdefault(key, [])
        self._idle.move_to_end(key)
        now = time.monotonic()
        # Services close idle keep-alive connections (Node after 5 s): older entries are dropped here.
        while entries and (len(entries) >= self.per_port or now - entries[0][0] >= self.idle_seconds):
            entries.pop(0)[1].cancel()
        entries.append((now, tunnel, conn))
        while len(self._idle) > self.max_ports:
            _, dropped = self._idle.popitem(last=False)
            for _, old, _ in dropped:
                old.cancel()


# -- WebSocket ---------------------------------------------------------------------------------------


_Head = tuple[str, str, list[tuple[bytes, bytes]]]


def _parse_head(data: bytes) -> _Head | None:
    """(method, target, headers) of the complete request head uvicorn hands an upgrade protocol."""
    head, sep, _ = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            headers.append((name.strip().lower(), value.strip()))
    return parts[0].decode("latin-1"), parts[1].decode("latin-1"), headers


def raw_error_response(err: http_errors.HttpError) -> bytes:
    """An HTTP/1.1 error response as bytes, for a connection taken over from the ASGI server."""
    body = err.body_bytes()
    try:
        phrase = HTTPStatus(err.status).phrase
    except ValueError:
        phrase = "Error"
    lines = [
        f"HTTP/1.1 {err.status} {phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{k}: {v}" for k, v in err.headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _RawRelay:
    """A WebSocket upgrade to a preview: the handshake request forwarded, then bytes both ways.

    The client's bytes queue (bounded by pausing the socket's reading) in front of one writer task;
    the service's bytes are written to the socket as they come, and the relay waits while the
    socket's buffer is above its high-water mark, so neither side can make the gateway hold more
    than a few messages.
    """

    _HIGH_WATER = 64

    def __init__(self, previews: Previews, transport: asyncio.Transport, head: _Head) -> None:
        self.previews, self.transport, self.head = previews, transport, head
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.writable = asyncio.Event()
        self.writable.set()
        self.lost = False
        self.task = asyncio.get_running_loop().create_task(self.run())

    def feed(self, data: bytes | None) -> None:
        self.queue.put_nowait(data)
        if self.queue.qsize() > self._HIGH_WATER:
            self.transport.pause_reading()

    def connection_lost(self) -> None:
        self.lost = True
        self.writable.set()
        self.task.cancel()

    async def run(self) -> None:
        method, raw_target, header_list = self.head
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in header_list}
        path, _, query = raw_target.partition("?")
        target = self.previews.match(headers, path)
        assert target is not None  # checked by the protocol before it built this relay
        try:
            access = await self.previews.authorize(target, headers, query)
            forwarded = {
                "x-forwarded-host": headers.get("host", ""),
                "x-forwarded-proto": "http",
                "x-forwarded-prefix": target.path_prefix,
            }
            upstream = upstream_headers(
                header_list, target.port, drop=access.drop, cookie=access.cookie, forwarded=forwarded
            )
            # The upgrade is the one hop-by-hop exchange the service must see.
            upstream += [(b"connection", b"Upgrade"), (b"upgrade", headers.get("upgrade", "websocket").encode())]
            lines = [f"{method} {access.request_target} HTTP/1.1".encode("latin-1")]
            lines += [name + b": " + value for name, value in upstream]
            tunnel = await Tunnel.open(access, b"\r\n".join(lines) + b"\r\n\r\n")
        except RpcError as exc:
            self.previews._unreachable(exc, target)
            if not self.lost:
                self.transport.write(raw_error_response(_bad_gateway(exc)))
                self.transport.close()
            return
        writer = asyncio.create_task(self._client_to_service(tunnel))
        try:
            async for data in tunnel.responses():
                if not data:
                    if self.transport.can_write_eof():
                        self.transport.write_eof()
                    continue
                await self.writable.wait()
                if self.lost:
                    return
                self.transport.write(data)
        except RpcError as exc:
            _log.info("preview websocket ended", extra={"port": target.port, "reason": exc.message})
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, RpcError):
                await writer
            tunnel.cancel()
            if not self.transport.is_closing():
                self.transport.close()

    async def _client_to_service(self, tunnel: Tunnel) -> None:
        while (data := await self.queue.get()) is not None:
            await tunnel.write(data)
            if self.queue.qsize() < self._HIGH_WATER // 2 and not self.lost:
                self.transport.resume_reading()
        await tunnel.done_writing()


def websocket_protocol(previews: Previews, fallback_name: str = "websockets") -> type[asyncio.Protocol]:
    """uvicorn's WebSocket protocol class, wrapped so an upgrade naming a preview is relayed as bytes.

    uvicorn hands an upgrade to this class with the whole request head as the first data; if the
    head names a preview, the connection is ours; else every callback goes to uvicorn's class.
    """
    from uvicorn.config import WS_PROTOCOLS
    from uvicorn.importer import import_from_string

    fallback: Any = import_from_string(WS_PROTOCOLS[fallback_name])

    class PreviewOrWebSocket(asyncio.Protocol):
        def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
            self._args = (config, server_state, app_state, _loop)
            self._inner: Any = None
            self._relay: _RawRelay | None = None
            self._transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self._transport = transport

        def data_received(self, data: bytes) -> None:
            if self._inner is not None:
                self._inner.data_received(data)
                return
            if self._relay is not None:
                self._relay.feed(data)
                return
            assert self._transport is not None
            head = _parse_head(data)
            if head is not None:
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head[2]}
                if previews.match(headers, head[1].partition("?")[0]) is not None:
                    self._relay = _RawRelay(previews, self._transport, head)
                    return
            config, server_state, app_state, loop = self._args
            self._inner = fallback(config=config, server_state=server_state, app_state=app_state, _loop=loop)
            self._inner.connection_made(self._transport)
            self._inner.data_received(data)

        def eof_received(self) -> bool | None:
            if self._inner is not None:
                result: bool | None = self._inner.eof_received()
                return result
            if self._relay is not None:
                self._relay.feed(None)  # half-close toward the service; its answer may still come
                return True
            return None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._inner is not None:
                self._inner.connection_lost(exc)
            elif self._relay is not None:
                self._relay.connection_lost()

        def pause_writing(self) -> None:
            if self._inner is not None:
                self._inner.pause_writing()
            elif self._relay is not None:
                self._relay.writable.clear()

        def resume_writing(self) -> None:
            if self._inner is not None:
                self._inner.resume_writing()
            elif self._relay is not None:
                self._relay.writable.set()

    return PreviewOrWebSocket


class PreviewServicer(ports_pb2_grpc.PreviewServiceServicer):
    """Serves cyberdesk.v1.PreviewService on the gateway's gRPC port (the gateway holds the secret)."""

    def __init__(self, previews: Previews) -> None:
        self._previews = previews

    async def CreatePreviewUrl(
        self,
        request: ports_pb2.CreatePreviewUrlRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> ports_pb2.CreatePreviewUrlResponse:
        """Preview URLs and a signed token for a port of one of the caller's instances."""
        metadata = [(k, v) for k, v in context.invocation_metadata() or ()]
        return await self._previews.create_url(request, metadata)
