"""`instance.files`: move files in and out of an instance and manage its tree."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from cyberdesk._async._io import AsyncBackground, open_local, read_chunk
from cyberdesk._async._transport import AsyncResponseStream, AsyncTransport
from cyberdesk._errors import DataLoss, NotFound
from cyberdesk._local import Destination, Progress, Source, open_source, size_of
from cyberdesk._models import FileInfo, FsEvent, UploadResult
from cyberdesk._requests import CHUNK, upload_header
from cyberdesk_proto.v1 import filesystem_pb2


async def upload_requests(
    instance_id: str,
    stream: BinaryIO,
    header: filesystem_pb2.UploadFileHeader,
    digest: hashlib._Hash,
    total: int | None,
    progress: Progress | None,
) -> AsyncIterator[filesystem_pb2.UploadFileRequest]:
    """Header, then chunks of `stream`, hashing what is sent and reporting progress.

    `digest` is complete once the iteration is exhausted (the last hash job is waited for).
    """
    yield filesystem_pb2.UploadFileRequest(instance_id=instance_id, header=header)
    done = 0
    async with AsyncBackground() as hasher:
        while chunk := await read_chunk(stream, CHUNK):
            # The chunk is hashed while gRPC serialises and sends it (bytes are immutable, so
            # sharing it between the two is safe).
            await hasher.run(digest.update, chunk)
            done += len(chunk)
            yield filesystem_pb2.UploadFileRequest(chunk=chunk)
            if progress is not None:
                progress(done, total)
        await hasher.wait()
    if progress is not None and done == 0:
        progress(0, total)


class AsyncFiles:
    """Files of one instance. Remote paths are absolute paths inside the instance."""

    def __init__(self, transport: AsyncTransport, instance_id: str) -> None:
        self._t = transport
        self._id = instance_id

    async def upload(
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
            total = size_of(stream)
            head = upload_header(path, overwrite=overwrite, create_parents=create_parents, mode=mode)
            requests = upload_requests(self._id, stream, head, digest, total, progress)
            reply = await self._t.unary(self._t.files.UploadFile, requests, timeout=None)
        finally:
            if owned:
                stream.close()
        if reply.sha256 and reply.sha256 != digest.hexdigest():
            raise DataLoss(f"upload of {path}: the instance stored sha256 {reply.sha256}, sent {digest.hexdigest()}")
        return UploadResult(reply.path, reply.size, reply.sha256)

    async def write(
        self, path: str, data: bytes | str, *, mode: int | None = None, create_parents: bool = True
    ) -> UploadResult:
        """Write bytes (or UTF-8 text) to `path`, replacing it."""
        payload = data.encode() if isinstance(data, str) else data
        return await self.upload(payload, path, overwrite=True, create_parents=create_parents, mode=mode)

    async def iter_download(self, path: str, *, offset: int = 0, length: int = 0) -> AsyncIterator[tuple[bytes, int]]:
        """Chunks of a file with the file's total size; the sha256 is checked at the end."""
        request = filesystem_pb2.DownloadFileRequest(instance_id=self._id, path=path, offset=offset, length=length)
        digest = hashlib.sha256()
        total = 0
        async with AsyncBackground() as hasher:
            async for reply in self._t.stream(self._t.files.DownloadFile, request):
                total = reply.total_size or total
                chunk = reply.chunk  # Each read of the field is a copy: read it once.
                if chunk:
                    # Hashed while the next message is received.
                    await hasher.run(digest.update, chunk)
                    yield chunk, total
                if reply.sha256:
                    await hasher.wait()
                    sha = digest.hexdigest()
                    if reply.sha256 != sha:
                        raise DataLoss(f"download of {path}: sha256 {sha} differs from the instance's {reply.sha256}")

    async def download(self, path: str, destination: Destination, *, progress: Progress | None = None) -> int:
        """Download `path` into a local file (path or open binary file); returns the byte count.

        A local path is written to a temporary name beside it and renamed when complete and verified.
        """
        if isinstance(destination, str | os.PathLike):
            target = Path(destination)
            partial = target.with_name(f".{target.name}.partial")
            try:
                out = await open_local(partial)
                try:
                    async with AsyncBackground() as writer:
                        # The file is ours: it is written in a helper thread while the next chunk arrives.
                        count = await self._copy(path, out, progress, writer)
                        await writer.wait()
                finally:
                    out.close()
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            return count
        return await self._copy(path, destination, progress)

    async def _copy(
        self, path: str, out: BinaryIO, progress: Progress | None, writer: AsyncBackground | None = None
    ) -> int:
        done = 0
        async for chunk, total in self.iter_download(path):
            if writer is not None:
                await writer.run(out.write, chunk)
            else:
                out.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        return done

    async def read(self, path: str) -> bytes:
        """The whole content of a file."""
        return b"".join([chunk async for chunk, _ in self.iter_download(path)])

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The content of a text file."""
        data = await self.read(path)
        return data.decode(encoding)

    async def list(self, path: str, *, depth: int = 1) -> list[FileInfo]:
        """Entries of a directory (`depth` levels deep), sorted by path."""
        request = filesystem_pb2.ListDirectoryRequest(instance_id=self._id, path=path, depth=depth)
        reply = await self._t.unary(self._t.files.ListDirectory, request)
        return [FileInfo.from_proto(e) for e in reply.entries]

    async def stat(self, path: str) -> FileInfo:
        """Metadata of a path (symlinks are not followed)."""
        request = filesystem_pb2.StatPathRequest(instance_id=self._id, path=path)
        reply = await self._t.unary(self._t.files.StatPath, request)
        return FileInfo.from_proto(reply.info)

    async def exists(self, path: str) -> bool:
        """Whether the path exists."""
        try:
            await self.stat(path)
        except NotFound:
            return False
        return True

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, or a directory (`recursive` when not empty)."""
        request = filesystem_pb2.RemovePathRequest(instance_id=self._id, path=path, recursive=recursive)
        await self._t.unary(self._t.files.RemovePath, request)

    async def make_dir(self, path: str, *, parents: bool = True, mode: int | None = None) -> FileInfo:
        """Make a directory (with its parents, succeeding if it exists, unless parents=False)."""
        request = filesystem_pb2.MakeDirectoryRequest(instance_id=self._id, path=path, parents=parents, mode=mode or 0)
        reply = await self._t.unary(self._t.files.MakeDirectory, request)
        return FileInfo.from_proto(reply.info)

    async def move(self, source: str, destination: str, *, overwrite: bool = False) -> FileInfo:
        """Move or rename a file or directory."""
        request = filesystem_pb2.MovePathRequest(
            instance_id=self._id, source=source, destination=destination, overwrite=overwrite
        )
        reply = await self._t.unary(self._t.files.MovePath, request)
        return FileInfo.from_proto(reply.info)

    async def watch(self, path: str, *, recursive: bool = False) -> AsyncWatch:
        """Watch a directory; returns once the watch is in place, so every later change is reported."""
        request = filesystem_pb2.WatchDirectoryRequest(instance_id=self._id, path=path, recursive=recursive)
        watch = AsyncWatch(self._t.stream(self._t.files.WatchDirectory, request))
        await watch._wait_started()
        return watch


class AsyncWatch:
    """The changes below a watched directory (FsEvent), iterated as they happen.

    `close()` (or leaving its context manager's block) ends the watch; an iteration in progress
    then ends quietly.
    """

    def __init__(self, stream: AsyncResponseStream) -> None:
        self._stream = stream
        self._replies = stream.__aiter__()

    async def _wait_started(self) -> None:
        async for reply in self._replies:
            if reply.WhichOneof("event") == "started":
                return

    def __aiter__(self) -> AsyncIterator[FsEvent]:
        return self._changes()

    async def _changes(self) -> AsyncIterator[FsEvent]:
        async for reply in self._replies:
            if reply.WhichOneof("event") == "change":
                yield FsEvent.from_proto(reply.change)

    async def close(self) -> None:
        """Stop watching."""
        self._stream.cancel()

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
