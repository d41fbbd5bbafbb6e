"""stream_unary_result: a client stream the server refuses mid-upload reports the server's status, never INTERNAL."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import grpc

from cyberdesk._client_stream import CORE_WRITE_FAILURE, stream_unary_result

CALLS = 2000  # plain `await call` got INTERNAL in 4-15 of 1,500-3,000 on this machine: the old way fails here


async def _refuse(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
    async for _ in requests:
        context.set_trailing_metadata((("why", "exists"),))
        await context.abort(grpc.StatusCode.ALREADY_EXISTS, "the file exists")
    return b""


async def _outcomes() -> Counter[str]:
    server = grpc.aio.server()
    handler = grpc.stream_unary_rpc_method_handler(_refuse)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Files", {"Upload": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    seen: Counter[str] = Counter()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            upload = channel.stream_unary("/t.Files/Upload", None, None)
            for _ in range(CALLS):

                async def body() -> AsyncIterator[bytes]:
                    for _ in range(50):  # still writing when the refusal comes in
                        yield b"x" * 65536

                try:
                    await stream_unary_result(upload(body(), timeout=30))
                    seen["ok"] += 1
                except grpc.aio.AioRpcError as err:
                    trailers = dict(err.trailing_metadata() or ())
                    seen[f"{err.code().name} {err.details()} {trailers.get('why')}"] += 1
    finally:
        await server.stop(None)
    return seen


def test_every_refused_upload_reports_the_servers_status() -> None:
    seen = asyncio.run(_outcomes())
    assert seen == Counter({"ALREADY_EXISTS the file exists exists": CALLS}), seen
    assert not any(CORE_WRITE_FAILURE in outcome for outcome in seen)
