"""File download (`GET|HEAD .../files/{path=**}`): raw bytes with Range support and a sha256 check.

- The Range header is planned by `ranges` (206 with Content-Range, 416 when not satisfiable, any
  other form ignored); a suffix range costs one more upstream call to learn the file's size.
- Content-Length is always set, so a transfer cut short is visible to the client.
- The agent sends the sha256 of the bytes only after the last byte, and HTTP/1.1 trailers are not
  usable by common clients, so it is not a trailer: the gateway hashes what it relays and, on a
  mismatch or an agent failing mid-transfer, drops the connection before the body is complete (a
  client sees a short body, never wrong bytes). `HEAD` on the same URL (same Range rules) makes
  the agent read the bytes, sends none, and answers with `x-cyberdesk-sha256: <hex>` and
  `Repr-Digest: sha-256=:<base64>:` (RFC 9530; for a range: of the range), so a client can check
  a GET against it.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

import grpc

from cyberdesk_common.status import RpcError
from gateway_svc.rest import ranges
from gateway_svc.rest.asgi import ResponseAborted, Send, respond_error, start_response
from gateway_svc.rest.http_bindings import HttpBinding
from gateway_svc.rest.upstream import Upstream

SHA256_HEADER = "x-cyberdesk-sha256"
OCTETS = "application/octet-stream"


async def serve_download(
    upstream: Upstream, send: Send, binding: HttpBinding, request: Any, headers: Mapping[str, str], head: bool
) -> None:
    """Relay DownloadFile as raw bytes (GET) or as its length and sha256 only (HEAD).

    ResponseAborted when the body started and cannot be completed correctly.
    """
    wanted = ranges.parse_range(headers.get("range", ""))
    ranged = wanted is not None
    try:
        if wanted is not None:
            total = await file_size(upstream, binding, request, headers) if wanted.is_suffix else None
            window = ranges.request_window(wanted, total)
            request.offset, request.length = window.offset, window.length
        await _relay(upstream, send, binding, request, headers, head, ranged)
    except ranges.RangeNotSatisfiable as exc:
        await respond_error(send, exc.http_error())


async def _relay(
    upstream: Upstream,
    send: Send,
    binding: HttpBinding,
    request: Any,
    headers: Mapping[str, str],
    head: bool,
    ranged: bool,
) -> None:
    stream = upstream.server_stream(binding, request, headers)
    try:
        try:
            first: Any = await anext(stream)
        except StopAsyncIteration:
            raise RpcError(grpc.StatusCode.INTERNAL, "the agent ended the download without a message") from None
        except RpcError as exc:
            if exc.code == grpc.StatusCode.OUT_OF_RANGE and ranged:
                raise ranges.RangeNotSatisfiable(await file_size(upstream, binding, request, headers)) from None
            raise
        plan = ranges.plan_response(ranges.Window(request.offset, request.length), first.total_size, ranged)
        extra = plan.headers()
        digest = hashlib.sha256()
        if not head:
            await start_response(send, plan.status, OCTETS, extra)
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
                raise ResponseAborted(f"the agent failed mid-download: {exc}") from None
        ours = digest.hexdigest()
        if agent_sha and agent_sha != ours:
            if head:
                raise RpcError(grpc.StatusCode.DATA_LOSS, "the bytes relayed do not match the agent's sha256")
            raise ResponseAborted("the bytes relayed do not match the agent's sha256")
        if head:
            extra[SHA256_HEADER] = ours
            extra["repr-digest"] = f"sha-256=:{base64.b64encode(digest.digest()).decode()}:"
            await start_response(send, plan.status, OCTETS, extra)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def file_size(upstream: Upstream, binding: HttpBinding, request: Any, headers: Mapping[str, str]) -> int:
    """The size of the file (a one-byte download: the first message carries the total)."""
    probe: Any = binding.new_request()
    probe.CopyFrom(request)
    probe.offset, probe.length = 0, 1
    stream = upstream.server_stream(binding, probe, headers)
    try:
        first: Any = await anext(stream)
        return int(first.total_size)
    except StopAsyncIteration:
        return 0
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
