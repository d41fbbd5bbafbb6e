"""Streamed JSON over HTTP: server streams out as NDJSON or Server-Sent Events, a client stream in as NDJSON.

Out (StartProcess, ConnectProcess, WatchInstances, WatchDirectory): each message is one
`{"result": <message>}` item. Until the first message an error is an ordinary HTTP error with its
status; after it the status line is sent already, so the failure becomes a last `{"error": Status}`
item and a clean end (no error item) can be told from a failure.

In (StreamProcessInput): the body is NDJSON, one request message a line, read as it arrives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from google.protobuf.message import Message

from cyberdesk_common.status import RpcError
from gateway_svc.rest import http_errors, json_mapping
from gateway_svc.rest.asgi import (
    MAX_JSON_BODY,
    Receive,
    Send,
    body_lines,
    respond_error,
    respond_message,
    start_response,
)
from gateway_svc.rest.http_bindings import HttpBinding
from gateway_svc.rest.upstream import StreamHead, Upstream

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


async def stream_responses(
    upstream: Upstream, send: Send, binding: HttpBinding, request: Message, headers: Mapping[str, str]
) -> None:
    """A server stream as NDJSON, or as SSE when the client's Accept names text/event-stream."""
    sse = SSE in headers.get("accept", "")
    media = SSE if sse else NDJSON

    def frame(item: Any, event: str) -> bytes:
        return json_mapping.sse_event(item, event) if sse else json_mapping.ndjson_line(item)

    started = False
    try:
        async for reply in upstream.server_stream(binding, request, headers):
            if isinstance(reply, StreamHead):
                # The server said it is in place: so does the response, with its headers.
                await start_response(send, 200, media, reply.headers)
                started = True
                continue
            if not started:
                # Until the first message an error is an ordinary HTTP error with its status.
                await start_response(send, 200, media)
                started = True
            item = frame(json_mapping.stream_result(binding, reply), "result")
            await send({"type": "http.response.body", "body": item, "more_body": True})
    except (RpcError, grpc.RpcError) as exc:
        err = http_errors.from_rpc_error(exc) if isinstance(exc, RpcError) else http_errors.from_grpc_error(exc)
        if not started:
            await respond_error(send, err)
            return
        # After the first message the status is already sent: the failure is the last item.
        await send({"type": "http.response.body", "body": frame({"error": err.body}, "error"), "more_body": True})
    if not started:
        await start_response(send, 200, media)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def call_with_ndjson_body(
    upstream: Upstream,
    receive: Receive,
    send: Send,
    binding: HttpBinding,
    variables: Mapping[str, str],
    query: bytes,
    headers: Mapping[str, str],
) -> None:
    """A JSON client stream: the body is NDJSON; the path and query fill the first message.

    Blank lines are skipped; a bad line is INVALID_ARGUMENT naming its number. Each message is
    handed upstream (and its flow control awaited) before the next line is read.
    """

    async def requests() -> AsyncIterator[Message]:
        number = 0
        first_sent = False
        async for line in body_lines(receive, MAX_JSON_BODY):
            number += 1
            if not line.strip():
                continue
            if not first_sent:
                first_sent = True
                yield json_mapping.decode_request(binding, variables, query, line)
            else:
                yield json_mapping.message_from_json(binding.request_class(), line, f"request line {number}")
        if not first_sent:
            # An empty body is one message with only what the path and query say.
            yield json_mapping.decode_request(binding, variables, query, b"")

    reply = await upstream.client_stream(binding, requests(), headers)
    await respond_message(send, binding, reply)
