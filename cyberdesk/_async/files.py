"""`instance.files`: move files in and out of an instance and manage its tree."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO, cast

import grpc

from cyberdesk._async._io import AsyncBackground, in_thread, open_local, pause, read_chunk
from cyberdesk._async._transport import AsyncResponseStream, AsyncTransport
from cyberdesk._errors import CyberdeskError, DataLoss, NotFound, Unavailable
from cyberdesk._local import (
    Backoff,
    Cursor,
    Destination,
    Progress,
    Source,
    new_upload_id,
    open_source,
    seekable,
    size_of,
)
from cyberdesk._models import FileInfo, FsEvent, UploadResult
from cyberdesk._requests import CHUNK, upload_header, upload_trailer
from cyberdesk_proto.v1 import filesystem_pb2

# Interruptions and resumes are logged as warnings: silent unless the application (or the CLI)
# configures logging, as a library should be.
_log = logging.getLogger("cyberdesk.files")
_log.addHandler(logging.NullHandler())


def _resumable(err: CyberdeskError, upload: bool) -> bool:
    """Whether `err` ended a transfer in a way worth trying again.

    Unavailable: the connection or a server on the way went away (a gateway restarted). For an
    upload, ABORTED too: an earlier try of the same upload is still being released by the agent.
    """
    return isinstance(err, Unavailable) or (upload and err.code is grpc.StatusCode.ABORTED)


async def upload_requests(
    instance_id: str,
    stream: BinaryIO,
    header: filesystem_pb2.UploadFileHeader,
    digest: hashlib._Hash,
    total: int | None,
    progress: Progress | None,
) -> AsyncIterator[filesystem_pb2.UploadFileRequest]:
    """Header, then chunks of `stream`, hashing what is sent and reporting progress, then the trailer.

    `digest` holds the hash of the `header.offset` bytes before (a resumed upload) and covers the
    whole file when the trailer goes out: the instance commits only on a trailer whose size and
    sha256 match, so a caller that dies mid-stream can never leave a half file.
    """
    yield filesystem_pb2.UploadFileRequest(instance_id=instance_id, header=header)
    done = header.offset
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
    yield upload_trailer(done, digest.hexdigest())


def _hash_prefix(source: Cursor, size: int) -> hashlib._Hash:
    """The sha256 of the next `size` bytes of `source` (the part of a resumed upload already stored)."""
    digest = hashlib.sha256()
    left = size
    while left > 0:
        block = source.read(min(CHUNK, left))
        if not block:
            raise DataLoss(f"the source ended {left} bytes before the {size} bytes already uploaded")
        digest.update(block)
        left -= len(block)
    return digest


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
        resume: bool = True,
    ) -> UploadResult:
        """Upload a local file (path), an open binary file or bytes to `path`.

        The file appears under its name only once complete, and its sha256 is checked against the
        bytes sent (DataLoss on a mismatch). With `resume` (the default) and a source that can
        seek, an upload cut by a lost connection (Unavailable) is resumed from the bytes the
        instance holds, with backoff, a bounded number of tries in a row without progress; a
        resumed upload is checked by the whole file's sha256 all the same. An upload given up
        leaves its partial bytes in a hidden file beside the target.
        """
        stream, owned = open_source(source)
        try:
            return await self._upload(stream, path, overwrite, create_parents, mode, progress, resume)
        finally:
            if owned:
                stream.close()

    async def _upload(
        self,
        stream: BinaryIO,
        path: str,
        overwrite: bool,
        create_parents: bool,
        mode: int | None,
        progress: Progress | None,
        resume: bool,
    ) -> UploadResult:
        total = size_of(stream)
        can_resume = resume and seekable(stream)
        upload_id = new_upload_id() if can_resume else ""
        start = stream.tell() if can_resume else 0
        lock = threading.Lock()
        backoff = Backoff()
        offset = 0
        reached = 0
        digest = hashlib.sha256()
        source: BinaryIO = stream
        while True:
            head = upload_header(
                path, overwrite=overwrite, create_parents=create_parents, mode=mode, upload_id=upload_id, offset=offset
            )
            if can_resume:
                # A cursor per try: the previous try's reader may still be finishing a read.
                source = cast(BinaryIO, Cursor(stream, start + offset, lock))
            requests = upload_requests(self._id, source, head, digest, total, progress)
            try:
                reply = await self._t.unary(self._t.files.UploadFile, requests, timeout=None)
                break
            except CyberdeskError as err:
                if not (can_resume and _resumable(err, upload=True)):
                    raise
                offset = await self._stored(path, upload_id, backoff, err)
                if offset > reached:
                    backoff.reset()  # bytes moved forward since the last interruption
                    reached = offset
                _log.warning("resuming the upload to %s from byte %d", path, offset)
                digest = await in_thread(_hash_prefix, Cursor(stream, start, lock), offset)
        if reply.sha256 and reply.sha256 != digest.hexdigest():
            raise DataLoss(f"upload of {path}: the instance stored sha256 {reply.sha256}, sent {digest.hexdigest()}")
        return UploadResult(reply.path, reply.size, reply.sha256)

    async def _stored(self, path: str, upload_id: str, backoff: Backoff, err: CyberdeskError) -> int:
        """After `err` cut the upload: wait, then ask the instance how many bytes it kept (0: none)."""
        request = filesystem_pb2.StatUploadRequest(instance_id=self._id, path=path, upload_id=upload_id)
        while True:
            delay = backoff.next_delay(progressed=False)
            if delay is None:
                raise err
            _log.warning("the upload to %s was interrupted (%s); trying again in %.2f s", path, err, delay)
            await pause(delay)
            try:
                reply = await self._t.unary(self._t.files.StatUpload, request)
            except NotFound:
                return 0
            except CyberdeskError as again:
                if not _resumable(again, upload=True):
                    raise
                err = again
                continue
            return int(reply.stored_size)

    async def write(
        self, path: str, data: bytes | str, *, mode: int | None = None, create_parents: bool = True
    ) -> UploadResult:
        """Write bytes (or UTF-8 text) to `path`, replacing it."""
        payload = data.encode() if isinstance(data, str) else data
        return await self.upload(payload, path, overwrite=True, create_parents=create_parents, mode=mode)

    async def iter_download(
        self, path: str, *, offset: int = 0, length: int = 0, resume: bool = True
    ) -> AsyncIterator[tuple[bytes, int]]:
        """Chunks of a file with the file's total size; the sha256 is checked at the end.

        A whole-file download (offset and length 0) cut by a lost connection (Unavailable) is
        resumed from the next byte, with backoff (see `upload`), unless `resume` is False; it then
        ends with the instance's sha256 of the whole file compared with the hash of every byte
        received. A file whose size changes between tries is DataLoss.
        """
        whole = resume and offset == 0 and length == 0
        digest = hashlib.sha256()
        position = offset
        total = -1
        backoff = Backoff()
        async with AsyncBackground() as hasher:
            while True:
                resumed = position > offset
                request = filesystem_pb2.DownloadFileRequest(
                    instance_id=self._id, path=path, offset=position, length=length, file_sha256=resumed
                )
                before = position
                try:
                    async for reply in self._t.stream(self._t.files.DownloadFile, request):
                        if reply.total_size or total < 0:
                            if total >= 0 and reply.total_size != total:
                                raise DataLoss(
                                    f"download of {path}: the file changed from {total} to {reply.total_size} "
                                    "bytes while it was being resumed"
                                )
                            total = reply.total_size
                        chunk = reply.chunk  # Each read of the field is a copy: read it once.
                        if chunk:
                            # Hashed while the next message is received.
                            await hasher.run(digest.update, chunk)
                            position += len(chunk)
                            yield chunk, total
                        if reply.sha256:
                            await hasher.wait()
                            sha = digest.hexdigest()
                            theirs = reply.file_sha256 if resumed else reply.sha256
                            if theirs != sha:
                                what = "the whole file's" if resumed else "the instance's"
                                raise DataLoss(f"download of {path}: sha256 {sha} differs from {what} {theirs}")
                            return
                    return
                except CyberdeskError as err:
                    if not (whole and _resumable(err, upload=False)):
                        raise
                    delay = backoff.next_delay(progressed=position > before)
                    if delay is None:
                        raise
                    _log.warning(
                        "the download of %s was interrupted at byte %d (%s); resuming in %.2f s",
                        path,
                        position,
                        err,
                        delay,
                    )
                    await pause(delay)

    async def download(
        self, path: str, destination: Destination, *, progress: Progress | None = None, resume: bool = True
    ) -> int:
        """Download `path` into a local file (path or open binary file); returns the byte count.

        A local path is written to a temporary name beside it and renamed when complete and
        verified. A lost connection is resumed from the next byte (see `iter_download`).
        """
        if isinstance(destination, str | os.PathLike):
            target = Path(destination)
            partial = target.with_name(f".{target.name}.partial")
            try:
                out = await open_local(partial)
                try:
                    async with AsyncBackground() as writer:
                        # The file is ours: it is written in a helper thread while the next chunk arrives.
                        count = await self._copy(path, out, progress, resume, writer)
                        await writer.wait()
                finally:
                    out.close()
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            return count
        return await self._copy(path, destination, progress, resume)

    async def _copy(
        self, path: str, out: BinaryIO, progress: Progress | None, resume: bool, writer: AsyncBackground | None = None
    ) -> int:
        done = 0
        async for chunk, total in self.iter_download(path, resume=resume):
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
