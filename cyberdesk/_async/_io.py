"""The async side's local I/O: file reads and opens off the event loop, and the helper thread.

Hand-written, with a twin of the same names in cyberdesk/_sync/_io.py. Hashing a 1 MiB chunk
takes ~0.6 ms and writing it to a local file up to as long again; done on the event loop they
would stall the gRPC stream (and every other task) for that time. hashlib and file writes release
the GIL, so in a helper thread they overlap with sending or receiving the next chunk.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, TypeVar

T = TypeVar("T")


async def pause(seconds: float) -> None:
    """Wait before a transfer's next try (asyncio.sleep; time.sleep on the sync side)."""
    await asyncio.sleep(seconds)


async def in_thread(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) in a worker thread (local disk work: re-hashing a resumed upload's bytes)."""
    return await asyncio.to_thread(fn, *args)


async def read_chunk(stream: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes of a local stream, read in a worker thread (a disk read blocks)."""
    return await asyncio.to_thread(stream.read, size)


async def open_local(path: str | os.PathLike[str]) -> BinaryIO:
    """A local file opened for writing, opened in a worker thread."""
    return await asyncio.to_thread(open, path, "wb")


class AsyncBackground:
    """Jobs run in order in one helper thread, at most one running while the caller goes on.

    `run` first waits for the job in flight, so memory holds two chunks at most. The thread is
    started on the first job, so a small transfer costs nothing more.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._job: asyncio.Future[object] | None = None

    async def run(self, fn: Callable[..., object], *args: object) -> None:
        """Queue fn(*args) after waiting for the previous job."""
        await self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cyberdesk-files")
        self._job = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def wait(self) -> None:
        """Wait for the job in flight; re-raises its exception."""
        job, self._job = self._job, None
        if job is not None:
            await job

    async def close(self) -> None:
        """Wait for the job in flight (without raising) and stop the thread."""
        job, self._job = self._job, None
        if job is not None:
            await asyncio.wait([job])
        if self._pool is not None:
            self._pool.shutdown(wait=False)  # idle now: the job above has finished
            self._pool = None

    async def __aenter__(self) -> AsyncBackground:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
