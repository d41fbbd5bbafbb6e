"""The caller's side of a file transfer: what may be uploaded, its size, the progress callback.

Shared by both clients; nothing here talks to the network.
"""

from __future__ import annotations

import io
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

Progress = Callable[[int, int | None], None]
"""Called as progress(bytes_done, bytes_total) while a transfer runs; total is None when unknown."""

Source = str | os.PathLike[str] | bytes | BinaryIO
"""What `files.upload` takes: a local path, bytes, or an open binary file."""

Destination = str | os.PathLike[str] | BinaryIO
"""What `files.download` writes to: a local path (written beside it, renamed when verified) or an open binary file."""


def size_of(stream: BinaryIO) -> int | None:
    """The size of a file-backed stream; None for a pipe or an in-memory stream without a descriptor."""
    try:
        return os.fstat(stream.fileno()).st_size
    except (OSError, io.UnsupportedOperation, AttributeError):
        return None


def open_source(source: Source) -> tuple[BinaryIO, bool]:
    """A readable binary stream for `source`, and whether the caller must close it."""
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source)), True
    if isinstance(source, str | os.PathLike):
        return open(source, "rb"), True
    return source, False


def seekable(stream: BinaryIO) -> bool:
    """Whether `stream` can be read again from an earlier position (what resuming an upload needs)."""
    try:
        return bool(stream.seekable())
    except (OSError, ValueError, AttributeError):
        return False


class Cursor(io.RawIOBase):
    """A read position of its own in a shared seekable stream: `read` seeks there first, under a lock.

    Each try of a resumable upload reads through a new Cursor, so a try given up while its request
    iterator is still inside a read (the gRPC side stops pulling only after the call ended) can
    never move the position of the try that replaces it.
    """

    def __init__(self, stream: BinaryIO, position: int, lock: threading.Lock) -> None:
        super().__init__()
        self._stream = stream
        self._lock = lock
        self.position = position

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        with self._lock:
            self._stream.seek(self.position)
            data = self._stream.read(size)
        self.position += len(data)
        return data


def new_upload_id() -> str:
    """A fresh upload_id (24 hex digits, within the agent's 8-64 of [A-Za-z0-9_-])."""
    return secrets.token_hex(12)


@dataclass
class Backoff:
    """When to try an interrupted transfer again: exponential delays, a bounded number in a row.

    Pure (it never sleeps). A retry that moved bytes forward starts the count again, so a long
    transfer over a flaky link may be resumed many times, but one that keeps failing without
    progress gives up after `attempts` tries (about 20 s of waiting with the defaults: long enough
    for a gateway to be restarted, short enough for a person at a terminal).
    """

    attempts: int = 8
    first: float = 0.25
    cap: float = 4.0
    failures: int = 0

    def next_delay(self, progressed: bool) -> float | None:
        """Seconds to wait before the next try; None when the transfer should give up."""
        if progressed:
            self.failures = 0
        self.failures += 1
        if self.failures > self.attempts:
            return None
        return float(min(self.cap, self.first * 2 ** (self.failures - 1)))

    def reset(self) -> None:
        """Bytes moved forward since the last failure: the count of tries in a row starts again."""
        self.failures = 0
