"""File upload (`PUT .../files/{path=**}`): the raw request body streamed to the agent's UploadFile.

The first message comes from the path and the query (the upload options); the body follows in
`UPLOAD_CHUNK` messages. At most one chunk plus one ASGI read is held: each chunk is handed to the
call, and its flow control awaited, before more of the body is read.

The last message is the trailer (size and sha256 of the body, hashed here as it is relayed), sent
only once the whole body has arrived: the ASGI server's last body event (Content-Length reached,
or the chunked terminator) and, when a Content-Length was given, exactly that many bytes. A client
that goes away mid-body makes the request stream fail, so the call is cancelled without a trailer
and the agent commits nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import grpc
from google.protobuf.message import Message

from cyberdesk_common.status import RpcError
from gateway_svc.rest import json_mapping
from gateway_svc.rest.asgi import Receive, Send, respond_message
from gateway_svc.rest.http_bindings import HttpBinding
from gateway_svc.rest.upstream import Upstream

UPLOAD_CHUNK = 1024 * 1024  # bytes per UploadFile message (the agent's own download chunk size)


async def upload_raw_body(
    upstream: Upstream,
    receive: Receive,
    send: Send,
    binding: HttpBinding,
    variables: Mapping[str, str],
    query: bytes,
    headers: Mapping[str, str],
) -> None:
    """PUT of a raw body: the first message from the path and query, then the body in chunks."""
    first = json_mapping.decode_request(binding, variables, upload_query(binding, query), None)
    declared = _content_length(headers)

    async def requests() -> AsyncIterator[Message]:
        yield first
        pending = bytearray()
        digest = hashlib.sha256()
        size = 0
        hashing: asyncio.Future[None] | None = None
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RpcError(grpc.StatusCode.CANCELLED, "the client went away before the body ended")
            pending += message.get("body", b"")
            more = bool(message.get("more_body", False))
            while len(pending) >= UPLOAD_CHUNK or (pending and not more):
                take = bytes(pending[:UPLOAD_CHUNK])
                del pending[:UPLOAD_CHUNK]
                size += len(take)
                # Hashed in a thread while the chunk is sent (hashlib releases the GIL); one at a
                # time, so the digest sees the body in order.
                if hashing is not None:
                    await hashing
                hashing = asyncio.ensure_future(asyncio.to_thread(digest.update, take))
                yield json_mapping.chunk_message(binding, take)
            if not more:
                break
        if hashing is not None:
            await hashing
        if declared is not None and size != declared:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, f"the body has {size} bytes, not its Content-Length of {declared}"
            )
        yield trailer_message(binding, size, digest.hexdigest())

    reply = await upstream.client_stream(binding, requests(), headers)
    await respond_message(send, binding, reply)


def trailer_message(binding: HttpBinding, size: int, sha256: str) -> Message:
    """The last message of the upload: the size and sha256 of the whole body."""
    msg: Any = binding.new_request()
    msg.trailer.size = size
    msg.trailer.sha256 = sha256
    return cast(Message, msg)


def _content_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def upload_query(binding: HttpBinding, query: bytes) -> list[tuple[str, str]]:
    """Query pairs where a name that is not a top-level field may name a field of the header message.

    For the upload, `?overwrite=true&mode=420` means `header.overwrite` / `header.mode` (the
    message that the path fills), as well as the full `header.overwrite=true`.
    """
    pairs = json_mapping.parse_query(query)
    parents = {v.field_path.split(".")[0] for v in binding.template.variables if "." in v.field_path}
    if len(parents) != 1:
        return pairs
    parent = parents.pop()
    desc = binding.request_descriptor
    out = []
    for key, value in pairs:
        head = re.split(r"[.\[]", key, maxsplit=1)[0]
        if json_mapping.find_field(desc, head) is None:
            key = f"{parent}.{key}"
        out.append((key, value))
    return out
