"""`instance.files`: move files in and out of an instance and manage its tree (blocking)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from cyberdesk._errors import Cancelled, DataLoss, InvalidArgument
from cyberdesk._models import FileInfo, FsEvent, UploadResult
from cyberdesk._requests import CHUNK
from cyberdesk._transport import Transport, iterate
from cyberdesk.v1 import filesystem_pb2

Progress = Callable[[int, int | None], None]
"""Called as progress(bytes_done, bytes_total) while a transfer runs; total is None when unknown."""

Source = str | os.PathLike[str] | bytes | BinaryIO


def _size_of(stream: BinaryIO) -> int | None:
    try:
        return os.fstat(stream.fileno()).st_size
    except (OSError, io.UnsupportedOperation, AttributeError):
        return None


def upload_requests(
    instance_id: str,
    stream: BinaryIO,
    header: filesystem_pb2.UploadFileHeader,
    digest: hashlib._Hash,
    total: int | None,
    progress: Progress | None,
) -> Iterator[filesystem_pb2.UploadFileRequest]:
    """Header, then chunks of `stream`, hashing what is sent and reporting progress."""
    yield filesystem_pb2.UploadFileRequest(instance_id=instance_id, header=header)
    done = 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        done += len(chunk)
        yield filesystem_pb2.UploadFileRequest(chunk=chunk)
        if progress is not None:
            progress(done, total)
    if progress is not None and done == 0:
        progress(0, total)


def open_source(source: Source) -> tuple[BinaryIO, bool]:
    """A readable binary stream for `source`, and whether the caller must close it."""
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source)), True
    if isinstance(source, str | os.PathLike):
        return open(source, "rb"), True
    return source, False


def header(
    path: str, *, overwrite: bool, create_parents: bool, mode: int | None, expected_sha256: str = ""
) -> filesystem_pb2.UploadFileHeader:
    """The UploadFileHeader for a destination path."""
    if not path.startswith("/"):
        raise InvalidArgument(f"remote path {path!r} must be absolute (start with /)")
    return filesystem_pb2.UploadFileHeader(
        path=path, mode=mode or 0, overwrite=overwrite, create_parents=create_parents, expected_sha256=expected_sha256
    )


class Files:
    """Files of one instance. Remote paths are absolute paths inside the instance."""

    def __init__(self, transport: Transport, instance_id: str) -> None:
        self._t = transport
        self._id = instance_id

    def upload(
        self,
        source: Source,
        path: str,
        *,
        overwrite: bool = True,
        create_parents: bool = True,
        mode: int | None = None,
        progress: Progress | None = None,
    ) -> UploadResult:
        """Upload a local file (path), an open binary file or bytes to `path`.

        The file appears under its name only once complete, and its sha256 is checked against the
        bytes sent (DataLoss on a mismatch).
        """
        stream, owned = open_source(source)
        try:
            digest = hashlib.sha256()
            total = _size_of(stream)
            head = header(path, overwrite=overwrite, create_parents=create_parents, mode=mode)
            requests = upload_requests(self._id, stream, head, digest, total, progress)
            reply = self._t.unary(self._t.files.UploadFile, requests, timeout=None)
        finally:
            if owned:
                stream.close()
        if reply.sha256 and reply.sha256 != digest.hexdigest():
            raise DataLoss(f"upload of {path}: the instance stored sha256 {reply.sha256}, sent {digest.hexdigest()}")
        return UploadResult(reply.path, reply.size, reply.sha256)

    def write(
        self, path: str, data: bytes | str, *, mode: int | None = None, create_parents: bool = True
    ) -> UploadResult:
        """Write bytes (or UTF-8 text) to `path`, replacing it."""
        payload = data.encode() if isinstance(data, str) else data
        return self.upload(payload, path, overwrite=True, create_parents=create_parents, mode=mode)

    def iter_download(self, path: str, *, offset: int = 0, length: int = 0) -> Iterator[tuple[bytes, int]]:
        """Chunks of a file with the file's total size; the sha256 is checked at the end."""
        request = filesystem_pb2.DownloadFileRequest(instance_id=self._id, path=path, offset=offset, length=length)
        digest = hashlib.sha256()
        total = 0
        for reply in iterate(self._t.stream(self._t.files.DownloadFile, request)):
            total = reply.total_size or total
            if reply.chunk:
                digest.update(reply.chunk)
                yield reply.chunk, total
            if reply.sha256 and reply.sha256 != digest.hexdigest():
                raise DataLoss(
                    f"download of {path}: sha256 {digest.hexdigest()} differs from the instance's {reply.sha256}"
                )

    def download(
        self, path: str, destination: str | os.PathLike[str] | BinaryIO, *, progress: Progress | None = None
    ) -> int:
        """Download `path` into a local file (path or open binary file); returns the byte count.

        A local path is written to a temporary name beside it and renamed when complete and verified.
        """
        if isinstance(destination, str | os.PathLike):
            target = Path(destination)
            partial = target.with_name(f".{target.name}.partial")
            try:
                with open(partial, "wb") as out:
                    count = self._copy(path, out, progress)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            return count
        return self._copy(path, destination, progress)

    def _copy(self, path: str, out: BinaryIO, progress: Progress | None) -> int:
        done = 0
        for chunk, total in self.iter_download(path):
            out.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        return done

    def read(self, path: str) -> bytes:
        """The whole content of a file."""
        return b"".join(chunk for chunk, _ in self.iter_download(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The content of a text file."""
        return self.read(path).decode(encoding)

    def list(self, path: str, *, depth: int = 1) -> list[FileInfo]:
        """Entries of a directory (`depth` levels deep), sorted by path."""
        request = filesystem_pb2.ListDirectoryRequest(instance_id=self._id, path=path, depth=depth)
        return [FileInfo.from_proto(e) for e in self._t.unary(self._t.files.ListDirectory, request).entries]

    def stat(self, path: str) -> FileInfo:
        """Metadata of a path (symlinks are not followed)."""
        request = filesystem_pb2.StatPathRequest(instance_id=self._id, path=path)
        return FileInfo.from_proto(self._t.unary(self._t.files.StatPath, request).info)

    def exists(self, path: str) -> bool:
        """Whether the path exists."""
        from cyberdesk._errors import NotFound

        try:
            self.stat(path)
        except NotFound:
            return False
        return True

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, or a directory (`recursive` when not empty)."""
        request = filesystem_pb2.RemovePathRequest(instance_id=self._id, path=path, recursive=recursive)
        self._t.unary(self._t.files.RemovePath, request)

    def make_dir(self, path: str, *, parents: bool = True, mode: int | None = None) -> FileInfo:
        """Make a directory (with its parents, succeeding if it exists, unless parents=False)."""
        request = filesystem_pb2.MakeDirectoryRequest(instance_id=self._id, path=path, parents=parents, mode=mode or 0)
        return FileInfo.from_proto(self._t.unary(self._t.files.MakeDirectory, request).info)

    def move(self, source: str, destination: str, *, overwrite: bool = False) -> FileInfo:
        """Move or rename a file or directory."""
        request = filesystem_pb2.MovePathRequest(
            instance_id=self._id, source=source, destination=destination, overwrite=overwrite
        )
        return FileInfo.from_proto(self._t.unary(self._t.files.MovePath, request).info)

    def watch(self, path: str, *, recursive: bool = False) -> Watch:
        """Watch a directory; returns once the watch is in place, so every later change is reported."""
        request = filesystem_pb2.WatchDirectoryRequest(instance_id=self._id, path=path, recursive=recursive)
        call = self._t.stream(self._t.files.WatchDirectory, request)
        watch = Watch(call)
        watch._wait_started()
        return watch


class Watch:
    """An iterator of FsEvent; `close()` (or leaving a `with` block) ends the watch."""

    def __init__(self, call: object) -> None:
        self._call = call
        self._events = iterate(call)
        self._closed = False

    def _wait_started(self) -> None:
        for reply in self._events:
            if reply.WhichOneof("event") == "started":
                return

    def __iter__(self) -> Iterator[FsEvent]:
        try:
            for reply in self._events:
                if reply.WhichOneof("event") == "change":
                    yield FsEvent.from_proto(reply.change)
        except Cancelled:
            if not self._closed:
                raise

    def close(self) -> None:
        """Stop watching; an iteration in progress ends quietly."""
        self._closed = True
        self._call.cancel()  # type: ignore[attr-defined]

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
