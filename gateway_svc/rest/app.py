"""The ASGI app of the REST face, served from the route table.

The app does no auth, rate limiting or routing itself: it calls an injected `Upstream`, which the
gateway wires (rest_upstream.GatewayUpstream) to the same admission code as its gRPC path and
hands the HTTP headers to (as gRPC metadata would be). What it serves:

- unary routes: a JSON body / query / path in, JSON out;
- server streams: NDJSON (default) or Server-Sent Events (`Accept: text/event-stream`); an error
  after the first message is a final `{"error": Status}` item;
- client streams with a JSON body (StreamProcessInput): the body is NDJSON, one message a line;
- file download (`GET .../files/{path=**}`): raw bytes with Range (206 / 416), `HEAD` for the
  size and sha256 (see `_download`);
- file upload (`PUT .../files/{path=**}`): the raw body streamed to the agent in chunks;
- bidirectional streams (ConnectPty): a WebSocket (see `_websocket`).

Every body is read incrementally; no file is ever held whole in memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from cyberdesk_common.status import RpcError, invalid_argument
from cyberdesk_proto.v1 import process_pb2
from gateway_svc.rest import http_errors as errors
from gateway_svc.rest import json_mapping as mapping
from gateway_svc.rest.http_bindings import Route, RouteTable, build_route_table
from gateway_svc.rest.path_templates import PathDecodeError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_log = logging.getLogger("gateway_svc.http")

MAX_JSON_BODY = 4 * 1024 * 1024  # JSON requests are small; bulk bytes travel on the raw-body routes
UPLOAD_CHUNK = 1024 * 1024  # bytes per UploadFile message (the agent's own download chunk size)
OPENAPI_FILE = Path(__file__).resolve().parents[2] / "openapi" / "cyberdesk.v1.openapi.json"
SHA256_HEADER = "x-cyberdesk-sha256"
WS_SUBPROTOCOL = "cyberdesk.v1"
WS_KEY_PREFIX = "cyberdesk.key."
_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")


class BidiStream(Protocol):
    """An open bidirectional call (see rest_upstream.BidiCall)."""

    async def write(self, message: Message) -> None:
        """Send one request."""
        ...

    async def done_writing(self) -> None:
        """Half-close."""
        ...

    def responses(self) -> AsyncIterator[Message]:
        """The responses."""
        ...

    def cancel(self) -> None:
        """Cancel the call."""
        ...


class Upstream(Protocol):
    """Calls an RPC on behalf of an HTTP request; raises RpcError or grpc.RpcError on failure."""

    async def unary(self, route: Route, request: Message, headers: Mapping[str, str]) -> Message:
        """One request, one response."""
        ...

    def server_stream(self, route: Route, request: Message, headers: Mapping[str, str]) -> AsyncIterator[Message]:
        """One request, a stream of responses."""
        ...

    async def client_stream(
        self, route: Route, requests: AsyncIterator[Message], headers: Mapping[str, str]
    ) -> Message:
        """A stream of requests (the first names the instance), one response."""
        ...

    async def open_bidi(self, route: Route, instance_id: str, headers: Mapping[str, str]) -> BidiStream:
        """Admit the caller and open a bidirectional call; raises RpcError when not admitted."""
        ...


class _Abort(Exception):
    """The response already started and cannot be completed: drop the connection."""


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
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        method: str = scope["method"].upper()
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        path = raw_path.decode("latin-1").split("?", 1)[0]
        if method in ("GET", "HEAD") and path == "/openapi.json":
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
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        query: bytes = scope.get("query_string", b"")
        try:
            if route.websocket:
                await _error(send, _upgrade_required(route))
                return
            if route.raw_request_field:
                await self._upload(receive, send, route, found.variables, query, headers)
                return
            if route.client_streaming:
                await self._ndjson_in(receive, send, route, found.variables, query, headers)
                return
            body = await _read_body(receive, MAX_JSON_BODY)
            request = mapping.decode_request(route, found.variables, query, body)
            if route.raw_response_field:
                await _until_disconnect(receive, self._download(send, route, request, headers, head=method == "HEAD"))
                return
            if route.server_streaming:
                await _until_disconnect(receive, self._stream(send, route, request, headers))
                return
            reply = await self.upstream.unary(route, request, headers)
        except RpcError as exc:
            await _error(send, errors.from_rpc_error(exc))
            return
        except grpc.RpcError as exc:
            await _error(send, errors.from_grpc_error(exc))
            return
        except _Abort as exc:
            # Returning without completing the response makes the server drop the connection, so
            # the client sees a short body (its Content-Length is not met), never a wrong one.
            _log.warning("response aborted", extra={"route": route.qualified_name, "reason": str(exc)})
            return
        await _respond(send, 200, mapping.dumps(mapping.encode_response(route, reply)), "application/json")

    # -- server streams -----------------------------------------------------------------------

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

    # -- client streams -------------------------------------------------------------------------

    async def _ndjson_in(
        self,
        receive: Receive,
        send: Send,
        route: Route,
        variables: Mapping[str, str],
        query: bytes,
        headers: Mapping[str, str],
    ) -> None:
        """A JSON client stream: the body is NDJSON; the path and query fill the first message."""

        async def requests() -> AsyncIterator[Message]:
            number = 0
            first_sent = False
            async for line in _lines(receive, MAX_JSON_BODY):
                number += 1
                if not line.strip():
                    continue
                if not first_sent:
                    first_sent = True
                    yield mapping.decode_request(route, variables, query, line)
                else:
                    yield mapping.message_from_json(route.request_class(), line, f"request line {number}")
            if not first_sent:
                # An empty body is one message with only what the path and query say.
                yield mapping.decode_request(route, variables, query, b"")

        reply = await self.upstream.client_stream(route, requests(), headers)
        await _respond(send, 200, mapping.dumps(mapping.encode_response(route, reply)), "application/json")

    async def _upload(
        self,
        receive: Receive,
        send: Send,
        route: Route,
        variables: Mapping[str, str],
        query: bytes,
        headers: Mapping[str, str],
    ) -> None:
        """PUT of a raw body: the first message from the path and query, then the body in chunks."""
        first = mapping.decode_request(route, variables, _short_query(route, query), None)

        async def requests() -> AsyncIterator[Message]:
            yield first
            pending = bytearray()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise RpcError(grpc.StatusCode.CANCELLED, "the client went away before the body ended")
                pending += message.get("body", b"")
                more = bool(message.get("more_body", False))
                # At most one chunk (plus one ASGI read) is held: each is sent and acknowledged by
                # flow control before more of the body is read.
                while len(pending) >= UPLOAD_CHUNK or (pending and not more):
                    take = bytes(pending[:UPLOAD_CHUNK])
                    del pending[:UPLOAD_CHUNK]
                    yield mapping.chunk_message(route, take)
                if not more:
                    return

        reply = await self.upstream.client_stream(route, requests(), headers)
        await _respond(send, 200, mapping.dumps(mapping.encode_response(route, reply)), "application/json")

    # -- raw download --------------------------------------------------------------------------

    async def _download(self, send: Send, route: Route, request: Any, headers: Mapping[str, str], head: bool) -> None:
        """Raw bytes of a file with Range support.

        - `Range: bytes=a-b`, `bytes=a-` and `bytes=-n` (one range) answer 206 with Content-Range;
          a range starting past the end is 416 with `Content-Range: bytes */<size>`. A Range
          header of another form is ignored (200), as RFC 9110 allows.
        - Content-Length is always set, so a transfer cut short is visible to the client.
        - The agent sends the sha256 of the bytes only after the last byte; the gateway hashes
          what it relays and, on a mismatch, drops the connection before the body is complete.
          `HEAD` on the same URL (same Range rules) reads the bytes at the agent, sends none, and
          answers with `x-cyberdesk-sha256: <hex>` and `Repr-Digest: sha-256=:<base64>:` (for a
          range: of the range), so a client can check a GET against it.
        """
        wanted = _parse_range(headers.get("range", ""))
        ranged = wanted is not None
        if wanted is not None:
            start, end = wanted
            if start is None:  # suffix: the last `end` bytes
                total = await self._file_size(route, request, headers)
                if end is None or end == 0 or total == 0:
                    await _error(send, _unsatisfiable(total))
                    return
                start, end = max(0, total - end), total - 1
            request.offset = start
            request.length = 0 if end is None else end - start + 1
        stream = self.upstream.server_stream(route, request, headers)
        try:
            try:
                first: Any = await anext(stream)
            except StopAsyncIteration:
                raise RpcError(grpc.StatusCode.INTERNAL, "the agent ended the download without a message") from None
            except RpcError as exc:
                if exc.code == grpc.StatusCode.OUT_OF_RANGE and ranged:
                    await _error(send, _unsatisfiable(await self._file_size(route, request, headers)))
                    return
                raise
            total = first.total_size
            offset = request.offset
            end_excl = total if request.length == 0 else min(total, offset + request.length)
            if ranged and offset >= total:
                await _error(send, _unsatisfiable(total))
                return
            length = max(0, end_excl - offset)
            extra = {"accept-ranges": "bytes", "content-length": str(length)}
            status = 200
            if ranged:
                status = 206
                extra["content-range"] = f"bytes {offset}-{end_excl - 1}/{total}"
            digest = hashlib.sha256()
            if not head:
                await _start(send, status, "application/octet-stream", extra)
            message: Any = first
            agent_sha = ""
            while True:
                chunk: bytes = message.chunk
                if chunk:
                    digest.update(chunk)
                    if not head:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if message.sha256:
                    agent_sha = message.sha256
                try:
                    message = await anext(stream)
                except StopAsyncIteration:
                    break
                except (RpcError, grpc.RpcError) as exc:
                    if head:
                        raise
                    raise _Abort(f"the agent failed mid-download: {exc}") from None
            ours = digest.hexdigest()
            if agent_sha and agent_sha != ours:
                if head:
                    raise RpcError(grpc.StatusCode.DATA_LOSS, "the bytes relayed do not match the agent's sha256")
                raise _Abort("the bytes relayed do not match the agent's sha256")
            if head:
                extra[SHA256_HEADER] = ours
                extra["repr-digest"] = f"sha-256=:{base64.b64encode(digest.digest()).decode()}:"
                await _start(send, status, "application/octet-stream", extra)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def _file_size(self, route: Route, request: Any, headers: Mapping[str, str]) -> int:
        """The size of the file (a one-byte download: the first message carries the total)."""
        probe: Any = route.new_request()
        probe.CopyFrom(request)
        probe.offset, probe.length = 0, 1
        stream = self.upstream.server_stream(route, probe, headers)
        try:
            first: Any = await anext(stream)
            return int(first.total_size)
        except StopAsyncIteration:
            return 0
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    # -- WebSocket (ConnectPty) ----------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A bidirectional stream over WebSocket (ConnectPty).

        The key comes from the `authorization` / `x-api-key` headers or, for clients that cannot
        set headers (browsers), from a subprotocol `cyberdesk.key.<key>`; offer `cyberdesk.v1`
        too and the server selects it. A refused handshake is an HTTP error response with the
        usual JSON Status body. Frames: binary = terminal bytes both ways; text = JSON control,
        see docs/rest.md. The socket closes with 1000 after `exit`, 4000 + gRPC code after `error`.
        """
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        path = raw_path.decode("latin-1").split("?", 1)[0]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        offered: list[str] = list(scope.get("subprotocols") or [])
        for proto in offered:
            if proto.startswith(WS_KEY_PREFIX) and "authorization" not in headers and "x-api-key" not in headers:
                headers["x-api-key"] = proto[len(WS_KEY_PREFIX) :]
        try:
            found = self.table.match("GET", path)
            if found is None or not found.route.websocket:
                raise RpcError(grpc.StatusCode.NOT_FOUND, f"no WebSocket route for {path}")
            route = found.route
            first: Any = mapping.decode_request(route, found.variables, scope.get("query_string", b""), None)
            call = await self.upstream.open_bidi(route, first.instance_id, headers)
        except (RpcError, PathDecodeError) as exc:
            rpc = exc if isinstance(exc, RpcError) else invalid_argument(str(exc))
            await _ws_reject(scope, send, errors.from_rpc_error(rpc))
            return
        accept: dict[str, Any] = {"type": "websocket.accept"}
        if WS_SUBPROTOCOL in offered:
            accept["subprotocol"] = WS_SUBPROTOCOL
        await send(accept)
        await _PtySession(route, call, first, receive, send).run()

    def _openapi_bytes(self) -> bytes:
        if self._openapi is None:
            if OPENAPI_FILE.exists():
                self._openapi = OPENAPI_FILE.read_bytes()
            else:
                from gateway_svc.rest.openapi import build_document

                self._openapi = json.dumps(build_document(self.table)).encode("utf-8")
        return self._openapi


class _PtySession:
    """Relays one WebSocket to one ConnectPty call until either side ends."""

    def __init__(self, route: Route, call: BidiStream, first: Any, receive: Receive, send: Send) -> None:
        self.route, self.call, self.first = route, call, first
        self.receive, self._send = receive, send
        self._lock = asyncio.Lock()
        self.closed = False
        self.client_left = False

    async def send_json(self, value: Mapping[str, Any]) -> None:
        await self.send({"type": "websocket.send", "text": json.dumps(value, separators=(",", ":"))})

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if self.closed:
            return
        async with self._lock:
            try:
                await self._send(message)
            except (OSError, RuntimeError):
                # The client is gone (uvicorn raises ClientDisconnected, an OSError).
                self.closed = True

    async def close(self, code: int, reason: str = "") -> None:
        await self.send({"type": "websocket.close", "code": code, "reason": reason[:120]})
        self.closed = True

    async def fail(self, err: RpcError) -> None:
        body = errors.status_body(err.code, err.message, err.details)
        await self.send_json({"type": "error", **body})
        await self.close(4000 + int(err.code.value[0]), err.code.name)

    async def run(self) -> None:
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
                await self._outbound(reply)
            await self.close(1000, "exit")
        except RpcError as exc:
            await self.fail(exc)
        except asyncio.CancelledError:
            # grpc.aio reports the call we cancelled because the client left as CancelledError;
            # only a cancellation of this task itself must propagate.
            task = asyncio.current_task()
            if not self.client_left or (task is not None and task.cancelling()):
                raise
        finally:
            inbound.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await inbound
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
            request = _control_request(text, first=True)
            request.instance_id = self.first.instance_id
            return request

    async def _outbound(self, reply: Any) -> None:
        kind = reply.WhichOneof("event")
        if kind == "output":
            await self.send({"type": "websocket.send", "bytes": bytes(reply.output)})
        elif kind == "started":
            await self.send_json({"type": "started", **mapping.message_to_json_value(reply.started)})
        elif kind == "exited":
            await self.send_json({"type": "exit", **mapping.message_to_json_value(reply.exited)})
        # keepalive: WebSocket has its own pings

    async def _inbound(self) -> None:
        try:
            while True:
                message = await self.receive()
                if message["type"] == "websocket.disconnect":
                    # The client left: end the call (the agent detaches this client only).
                    self.client_left = self.closed = True
                    self.call.cancel()
                    return
                data = message.get("bytes")
                if data is not None:
                    await self.call.write(process_pb2.ConnectPtyRequest(input=data))
                    continue
                try:
                    request = _control_request(message.get("text") or "", first=False)
                except RpcError as exc:
                    # A bad control frame is reported and skipped; the terminal stays open.
                    await self.send_json({"type": "error", **errors.status_body(exc.code, exc.message)})
                    continue
                await self.call.write(request)
        except RpcError:
            return  # the call ended; the response side reports how


_SIGNALS = {name.removeprefix("SIGNAL_"): number for name, number in process_pb2.Signal.items() if number}


def _control_request(text: str, first: bool) -> Any:
    """A ConnectPtyRequest from a JSON control frame; INVALID_ARGUMENT naming what is wrong."""
    try:
        frame = json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid_argument(f"control frame is not valid JSON: {exc.msg}") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise invalid_argument('a control frame is a JSON object with a "type"')
    kind = frame["type"]
    allowed = {"open", "attach"} if first else {"resize", "signal"}
    if kind not in allowed:
        raise invalid_argument(f"control frame type {kind!r} is not allowed here; expected one of {sorted(allowed)}")
    request = process_pb2.ConnectPtyRequest()
    try:
        if kind == "open":
            known = {"type", "cols", "rows", "argv", "env", "cwd", "tag", "background"}
            _no_unknown(frame, known)
            opened = process_pb2.PtyOpen(
                argv=[str(a) for a in _list(frame, "argv")],
                env={str(k): str(v) for k, v in _dict(frame, "env").items()},
                cwd=str(frame.get("cwd", "")),
                size=process_pb2.PtySize(cols=_uint(frame, "cols"), rows=_uint(frame, "rows")),
                tag=str(frame.get("tag", "")),
                background=bool(frame.get("background", False)),
            )
            request.open.CopyFrom(opened)
        elif kind == "attach":
            _no_unknown(frame, {"type", "pid", "tag"})
            if ("pid" in frame) == ("tag" in frame):
                raise invalid_argument('attach needs exactly one of "pid" and "tag"')
            if "pid" in frame:
                request.attach.selector.pid = _uint(frame, "pid")
            else:
                request.attach.selector.tag = str(frame["tag"])
        elif kind == "resize":
            _no_unknown(frame, {"type", "cols", "rows"})
            request.resize.CopyFrom(process_pb2.PtySize(cols=_uint(frame, "cols"), rows=_uint(frame, "rows")))
        else:
            _no_unknown(frame, {"type", "signal"})
            name = frame.get("signal")
            if isinstance(name, int) and not isinstance(name, bool) and name in _SIGNALS.values():
                request.signal = name  # type: ignore[assignment]
            elif isinstance(name, str) and name.upper().removeprefix("SIGNAL_") in _SIGNALS:
                request.signal = _SIGNALS[name.upper().removeprefix("SIGNAL_")]
            else:
                raise invalid_argument(f"signal {name!r} is not one of {', '.join(_SIGNALS)} (or their numbers)")
    except (TypeError, ValueError) as exc:
        raise invalid_argument(f"control frame {kind!r}: {exc}") from None
    return request


def _no_unknown(frame: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(frame) - known)
    if unknown:
        raise invalid_argument(f"control frame {frame['type']!r}: unknown field {unknown[0]!r}")


def _uint(frame: Mapping[str, Any], name: str) -> int:
    value = frame.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise invalid_argument(f"control frame {frame['type']!r}: {name} must be a non-negative integer")
    return value


def _list(frame: Mapping[str, Any], name: str) -> list[Any]:
    value = frame.get(name, [])
    if not isinstance(value, list):
        raise invalid_argument(f"control frame {frame['type']!r}: {name} must be a list")
    return value


def _dict(frame: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = frame.get(name, {})
    if not isinstance(value, dict):
        raise invalid_argument(f"control frame {frame['type']!r}: {name} must be an object")
    return value


def _parse_range(value: str) -> tuple[int | None, int | None] | None:
    """(start, end) of a single `bytes=` range; (None, n) for a suffix; None to ignore the header.

    An end before the start is not a valid range (ignored, like any malformed Range).
    """
    m = _RANGE.match(value.strip().replace(" ", ""))
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:
        return None, int(last)
    start = int(first)
    end = int(last) if last else None
    if end is not None and end < start:
        return None
    return start, end


def _unsatisfiable(total: int) -> errors.HttpError:
    err = errors.from_status(grpc.StatusCode.OUT_OF_RANGE, f"the range is not satisfiable: the file has {total} bytes")
    return errors.HttpError(416, err.body, {"Content-Range": f"bytes */{total}"})


def _upgrade_required(route: Route) -> errors.HttpError:
    err = errors.from_status(
        grpc.StatusCode.INVALID_ARGUMENT, f"{route.qualified_name} is a WebSocket: connect with Upgrade: websocket"
    )
    return errors.HttpError(426, err.body, {"Upgrade": "websocket", "Connection": "Upgrade"})


def _short_query(route: Route, query: bytes) -> list[tuple[str, str]]:
    """Query pairs where a name that is not a top-level field may name a field of the header message.

    For the upload, `?overwrite=true&mode=420` means `header.overwrite` / `header.mode` (the
    message that the path fills), as well as the full `header.overwrite=true`.
    """
    pairs = mapping.parse_query(query)
    parents = {v.field_path.split(".")[0] for v in route.template.variables if "." in v.field_path}
    if len(parents) != 1:
        return pairs
    parent = parents.pop()
    desc = route.request_descriptor
    out = []
    for key, value in pairs:
        head = re.split(r"[.\[]", key, maxsplit=1)[0]
        if mapping.find_field(desc, head) is None:
            key = f"{parent}.{key}"
        out.append((key, value))
    return out


async def _ws_reject(scope: Scope, send: Send, err: errors.HttpError) -> None:
    """Refuse a WebSocket handshake with an HTTP error response (or a close, if the server cannot)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        await send({"type": "websocket.http.response.start", "status": err.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": err.body_bytes()})
        return
    await send({"type": "websocket.close", "code": 1008})


async def _until_disconnect(receive: Receive, work: Coroutine[Any, Any, None]) -> None:
    """Run `work` (a streamed response) until it ends or the client disconnects, then cancel it.

    The request body is read already, so the next ASGI message is the disconnect. Without this a
    stream whose client left would keep its upstream call (e.g. a process's output) open.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
    if task.done() and not task.cancelled():
        task.result()  # re-raise what the response raised


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


async def _lines(receive: Receive, limit: int) -> AsyncIterator[bytes]:
    """The lines of a streamed body (without their newline), each at most `limit` bytes."""
    pending = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RpcError(grpc.StatusCode.CANCELLED, "the client went away before the body ended")
        pending += message.get("body", b"")
        while (cut := pending.find(b"\n")) >= 0:
            line = bytes(pending[:cut])
            del pending[: cut + 1]
            yield line
        if len(pending) > limit:
            raise invalid_argument(f"a request line is longer than {limit} bytes")
        if not message.get("more_body", False):
            if pending:
                yield bytes(pending)
            return


async def _start(send: Send, status: int, media: str, extra: Mapping[str, str] | None = None) -> None:
    headers = [(b"content-type", media.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _respond(send: Send, status: int, body: bytes, media: str, extra: Mapping[str, str] | None = None) -> None:
    await _start(send, status, media, extra)
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, err: errors.HttpError) -> None:
    await _respond(send, err.status, err.body_bytes(), "application/json", err.headers)
