"""The SDK's transfer helpers: hashing in a helper thread keeps order, completeness and errors.

Written for the async side; tools/unasync.py generates the same tests for the sync side.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading

import pytest

from cyberdesk._async._io import AsyncBackground
from cyberdesk._async.files import upload_requests
from cyberdesk._requests import CHUNK, upload_header


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_upload_requests_hash_every_byte_in_order() -> None:
    data = os.urandom(5 * CHUNK + 123)
    digest = hashlib.sha256()
    progress: list[tuple[int, int | None]] = []
    requests = upload_requests(
        "i-1",
        io.BytesIO(data),
        upload_header("/x", overwrite=True, create_parents=True, mode=None),
        digest,
        len(data),
        lambda done, total: progress.append((done, total)),
    )
    messages = [message async for message in requests]
    assert messages[0].header.path == "/x" and messages[0].instance_id == "i-1"
    assert b"".join(m.chunk for m in messages[1:]) == data
    assert max(len(m.chunk) for m in messages[1:]) == CHUNK
    # The last message is the trailer: the whole file's size and sha256, without which nothing is committed.
    assert messages[-1].WhichOneof("data") == "trailer"
    assert (messages[-1].trailer.size, messages[-1].trailer.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    # Complete as soon as the iteration is exhausted: the last job was waited for.
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert progress[-1] == (len(data), len(data))


@pytest.mark.anyio
async def test_background_runs_in_order_in_one_other_thread() -> None:
    seen: list[tuple[int, str]] = []
    async with AsyncBackground() as background:
        for i in range(50):
            await background.run(lambda i=i: seen.append((i, threading.current_thread().name)))
        await background.wait()
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} != {threading.current_thread().name}
    assert len({name for _, name in seen}) == 1


@pytest.mark.anyio
async def test_background_error_surfaces_at_next_run_or_wait() -> None:
    def fail() -> None:
        raise OSError(28, "No space left on device")

    async with AsyncBackground() as background:
        await background.run(fail)
        with pytest.raises(OSError, match="No space left"):
            await background.wait()
        await background.run(fail)
        with pytest.raises(OSError, match="No space left"):
            await background.run(lambda: None)
