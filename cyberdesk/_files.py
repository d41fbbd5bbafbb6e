"""`instance.files`: move files in and out of an instance and manage its tree (blocking)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from cyberdesk._errors import Cancelled, DataLoss, InvalidArgument
from cyberdesk._models import FileInfo, FsEvent, UploadResult
from cyberdesk._requests import CHUNK
from cyberdesk._transport import Transport, iterate
from cyberdesk_proto.v1 import filesystem_pb2

Progress = Callable[[int, int | None], None]
"""Called as progress(bytes_done, bytes_total) while a transfer runs; total is None when unknown."""

Source = str | os.PathLike[str] | bytes | BinaryIO


def _size_of(stream: BinaryIO) -> int | None:
    try:
        return os.fstat(stream.fileno()).st_size
    except (OSError, io.UnsupportedOperation, AttributeError):
        return None


class _Background:
    """Jobs run in order in one helper thread, at most one running while the caller goes on.

    Hashing a 1 MiB chunk takes ~0.6 ms and writing it to a local file up to as long again; done in
    the thread that drives the gRPC call they would stall the stream for that time. hashlib and
    file writes release the GIL, so here they overlap with sending or receiving the next chunk.
    The thread is started on the first job, so a small transfer costs nothing more.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._job: Future[object] | None = None

    def run(self, fn: Callable[..., object], *args: object) -> None:
        """Queue fn(*args) after waiting for the previous job (so memory holds two chunks at most)."""
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
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> _Background:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def upload_requests(
    instance_id: str,
    stream: BinaryIO,
    header: filesystem_pb2.UploadFileHeader,
    digest: hashlib._Hash,
    total: int | None,
    progress: Progress | None,
) -> Iterator[filesystem_pb2.UploadFileRequest]:
    """Header, then chunks of `stream`, hashing what is sent and reporting progress.

    `digest` is complete once the generator is exhausted (the last hash job is waited for).
    """
    yield filesystem_pb2.UploadFileRequest(instance_id=instance_id, header=header)
    done = 0
    with _Background() as hasher:
        while chunk := stream.read(CHUNK):
            # The chunk is hashed while gRPC serialises and sends it (bytes are immutable, so
            # sharing it between the two is safe).
            hasher.run(digest.update, chunk)
            done += len(chunk)
            yield filesystem_pb2.UploadFileRequest(chunk=chunk)
            if progress is not None:
                progress(done, total)
        hasher.wait()
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
        with _Background() as hasher:
            for reply in iterate(self._t.stream(self._t.files.DownloadFile, request)):
                total = reply.total_size or total
                chunk = reply.chunk  # Each read of the field is a copy: read it once.
                if chunk:
                    # Hashed while the next message is received.
                    hasher.run(digest.update, chunk)
                    yield chunk, total
                if reply.sha256:
                    hasher.wait()
                    sha = digest.hexdigest()
                    if reply.sha256 != sha:
                        raise DataLoss(f"download of {path}: sha256 {sha} differs from the instance's {reply.sha256}")

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
                with open(partial, "wb") as out, _Background() as writer:
                    # The file is ours: it is written in a helper thread while the next chunk arrives.
                    count = self._copy(path, out, progress, writer)
                    writer.wait()
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            return count
        return self._copy(path, destination, progress)

    def _copy(self, path: str, out: BinaryIO, progress: Progress | None, writer: _Background | None = None) -> int:
        done = 0
        for chunk, total in self.iter_download(path):
            if writer is not None:
                writer.run(out.write, chunk)
            else:
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
