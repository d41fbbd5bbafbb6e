"""The proxy's end marker (gateway_svc/proxy.py): an upload stream that ends without its trailer is cancelled.

Pure: the request relay is driven from plain async iterators of serialized messages, as grpc.aio
hands them to the proxy; the end-to-end behaviour is in tests/faults/test_upload_integrity.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cyberdesk_proto.v1 import filesystem_pb2 as fs
from gateway_svc.proxy import _END_FIELDS, _carries_field, _Requests, _Unfinished

UPLOAD = "/cyberdesk.v1.FilesystemService/UploadFile"
HEADER = fs.UploadFileRequest(instance_id="i-1", header=fs.UploadFileHeader(path="/f")).SerializeToString()
CHUNK = fs.UploadFileRequest(chunk=b"x" * 70_000).SerializeToString()
TRAILER = fs.UploadFileRequest(trailer=fs.UploadFileTrailer(size=70_000, sha256="a" * 64)).SerializeToString()


async def _relay(messages: list[bytes], end_field: int | None) -> tuple[list[bytes], _Requests]:
    async def rest() -> AsyncIterator[bytes]:
        for message in messages[1:]:
            yield message

    relay = _Requests(messages[0], rest(), end_field)
    return [m async for m in relay.messages()], relay


def test_the_upload_end_field_is_the_trailer() -> None:
    assert _END_FIELDS[UPLOAD] == fs.UploadFileRequest.DESCRIPTOR.fields_by_name["trailer"].number == 4


def test_carries_field_reads_tags_only() -> None:
    assert _carries_field(TRAILER, 4) and not _carries_field(CHUNK, 4) and not _carries_field(HEADER, 4)
    # A chunk whose bytes happen to contain the trailer's tag is still a chunk: payloads are skipped.
    tricky = fs.UploadFileRequest(chunk=bytes([0x22, 0x02, 0x08, 0x01]) * 10).SerializeToString()
    assert not _carries_field(tricky, 4)
    # A malformed message is not an end (the call is then cancelled, the safe side).
    assert not _carries_field(b"\xff\xff\xff", 4)
    assert not _carries_field(fs.UploadFileRequest(chunk=b"abc").SerializeToString()[:3], 4)


def test_a_stream_ended_by_its_trailer_is_relayed_whole() -> None:
    messages = [HEADER, CHUNK, TRAILER]
    relayed, relay = asyncio.run(_relay(messages, 4))
    assert relayed == messages and not relay.unfinished


@pytest.mark.parametrize("messages", [[HEADER], [HEADER, CHUNK], [HEADER, TRAILER, CHUNK]])
def test_a_stream_that_ends_without_its_trailer_raises_after_relaying_everything(messages: list[bytes]) -> None:
    async def scenario() -> tuple[list[bytes], _Requests]:
        async def rest() -> AsyncIterator[bytes]:
            for message in messages[1:]:
                yield message

        relay = _Requests(messages[0], rest(), 4)
        seen = []
        with pytest.raises(_Unfinished):
            async for message in relay.messages():
                seen.append(message)
        return seen, relay

    seen, relay = asyncio.run(scenario())
    assert seen == messages and relay.unfinished


def test_methods_without_an_end_field_end_as_the_caller_ends() -> None:
    relayed, relay = asyncio.run(_relay([HEADER, CHUNK], None))
    assert relayed == [HEADER, CHUNK] and not relay.unfinished
