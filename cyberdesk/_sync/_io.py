"""The sync side's local I/O: file reads and opens, and the helper thread.

Hand-written, the twin of cyberdesk/_async/_io.py. Hashing a 1 MiB chunk takes ~0.6 ms and
writing it to a local file up to as long again; done in the thread that drives the gRPC call they
would stall the stream for that time. hashlib and file writes release the GIL, so in a helper
thread they overlap with sending or receiving the next chunk.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, TypeVar

T = TypeVar("T")


def pause(seconds: float) -> None:
    """Wait before a transfer's next try."""
    time.sleep(seconds)


def in_thread(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) (the sync side is already off any event loop)."""
    return fn(*args)


def read_chunk(stream: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes of a local stream."""
    return stream.read(size)


def open_local(path: str | os.PathLike[str]) -> BinaryIO:
    """A local file opened for writing."""
    return open(path, "wb")


class Background:
    """Jobs run in order in one helper thread, at most one running while the caller goes on.

    `run` first waits for the job in flight, so memory holds two chunks at most. The thread is
    started on the first job, so a small transfer costs nothing more.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._job: Future[object] | None = None

    def run(self, fn: Callable[..., object], *args: object) -> None:
        """Queue fn(*args) after waiting for the previous job."""
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cyberdesk-files")
        self._job = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Wait for the job in flight; re-raises its exception."""
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def close(self) -> None:
        """Wait for the job in flight (without raising) and stop the thread."""
        self._job = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
