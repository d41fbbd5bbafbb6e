"""ASGI plumbing shared by the REST handlers: the callable types, request readers and response helpers.

Every reader takes the body incrementally from `receive`, so no handler ever holds a whole file;
a disconnect while the body is still arriving is CANCELLED, as it would be over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, MutableMapping
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from cyberdesk_common.status import RpcError, invalid_argument
from gateway_svc.rest import http_errors, json_mapping
from gateway_svc.rest.http_bindings import HttpBinding

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

T = TypeVar("T")

MAX_JSON_BODY = 4 * 1024 * 1024  # JSON requests are small; bulk bytes travel on the raw-body bindings


class ResponseAborted(Exception):
    """The response already started and cannot be completed: the app drops the connection."""


def request_path(scope: Scope) -> str:
    """The raw (still percent-encoded) path of the request, without its query string."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    return raw.decode("latin-1").split("?", 1)[0]


def request_headers(scope: Scope) -> dict[str, str]:
    """The request headers by lower-case name (a repeated header keeps its last value)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; INVALID_ARGUMENT past `limit` bytes."""
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


async def body_lines(receive: Receive, limit: int) -> AsyncIterator[bytes]:
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


async def start_response(send: Send, status: int, media: str, extra: Mapping[str, str] | None = None) -> None:
    """Send the status line and headers; the body follows in `http.response.body` messages."""
    headers = [(b"content-type", media.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def respond(send: Send, status: int, body: bytes, media: str, extra: Mapping[str, str] | None = None) -> None:
    """A complete response in one body message."""
    await start_response(send, status, media, extra)
    await send({"type": "http.response.body", "body": body})


async def respond_error(send: Send, err: http_errors.HttpError) -> None:
    """An error response: its status, its headers and the `google.rpc.Status` JSON body."""
    await respond(send, err.status, err.body_bytes(), "application/json", err.headers)


async def until_disconnect(receive: Receive, work: Coroutine[Any, Any, T]) -> T | None:
    """Run `work` until it ends or the client disconnects, then cancel it; its result, None if cut short.

    The request body is read already, so the next ASGI message is the disconnect. Without this a
    call whose client left would keep its upstream call open: a stream (a process's output) for as
    long as it runs, and a unary one (a RunProcess, a create) to its end, though nobody will read it.
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
        return task.result()  # re-raises what the work raised
    return None


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Answer the server's lifespan messages; the app has nothing to set up or tear down."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def respond_message(send: Send, binding: HttpBinding, reply: Message) -> None:
    """200 with a response message in the proto3 JSON mapping (only `response_body`, if the binding names one)."""
    await respond(send, 200, json_mapping.dumps(json_mapping.encode_response(binding, reply)), "application/json")
