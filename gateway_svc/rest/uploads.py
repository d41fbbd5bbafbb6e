"""File upload (`PUT .../files/{path=**}`): the raw request body streamed to the agent's UploadFile.

The first message comes from the path and the query (the upload options); the body follows in
`UPLOAD_CHUNK` messages. At most one chunk plus one ASGI read is held: each chunk is handed to the
call, and its flow control awaited, before more of the body is read.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping

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

    async def requests() -> AsyncIterator[Message]:
        yield first
        pending = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RpcError(grpc.StatusCode.CANCELLED, "the client went away before the body ended")
            pending += message.get("body", b"")
            more = bool(message.get("more_body", False))
            while len(pending) >= UPLOAD_CHUNK or (pending and not more):
                take = bytes(pending[:UPLOAD_CHUNK])
                del pending[:UPLOAD_CHUNK]
                yield json_mapping.chunk_message(binding, take)
            if not more:
                return

    reply = await upstream.client_stream(binding, requests(), headers)
    await respond_message(send, binding, reply)


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
