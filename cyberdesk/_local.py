"""The caller's side of a file transfer: what may be uploaded, its size, the progress callback.

Shared by both clients; nothing here talks to the network.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
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
