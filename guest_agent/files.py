"""FilesystemService: chunked upload and download with sha256, and the operations on the tree.

Memory stays flat whatever the file size: an upload writes each chunk as it arrives and a download
reads one chunk ahead, so at most three chunks per transfer are in memory. Disk I/O and hashing run
in a thread pool (both release the GIL), overlapped with the network: while chunk N is hashed and,
in parallel, written, chunk N+1 is being received; while chunk N is sent, chunk N+1 is read and
hashed.

Uploads are atomic: bytes go to a temporary file in the target's directory, which is renamed onto
the target only once complete (and matching `expected_sha256`). Writing to a path that is a
symbolic link replaces the file the link points to and keeps the link, as `echo > link` would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import stat
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from cyberdesk import keep_large_blocks
from cyberdesk_common.status import RpcError, failed_precondition, invalid_argument, not_found
from cyberdesk_proto.v1 import filesystem_pb2, filesystem_pb2_grpc
from guest_agent._fs import (
    check_sha256,
    check_upload_id,
    file_info,
    os_error,
    require_absolute,
    start_writeback,
    temp_name,
)
from guest_agent.identity import Identity
from guest_agent.watch import watch_directory

# 1 MiB: a bare grpc.aio server streaming protobuf messages to a client over a unix socket (no
# hashing, no disk) peaked at 1 MiB here: ~1,370 MB/s against ~1,080 at 256 KiB, ~1,030 at 4 MiB
# and ~950 at 8 MiB (larger messages fall out of the CPU caches). The SDK uploads 1 MiB chunks too.
DOWNLOAD_CHUNK = 1024 * 1024
# An upload asks the kernel to start writing back every this many bytes (see start_writeback).
WRITEBACK_EVERY = 16 * 1024 * 1024
# ListDirectory answers in one message: past this many entries ask for a smaller depth.
MAX_LIST_ENTRIES = 50_000

_T = TypeVar("_T")

# Threads for the chunks of transfers (hashing, writing, reading ahead): separate from the default
# pool so a burst of stat/list calls does not queue behind them, and sized so that a few
# transfers at once each have their lanes running.
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="files")


async def _io(fn: Callable[..., _T], *args: object) -> _T:
    """Run blocking filesystem work in the thread pool so the event loop keeps serving other calls."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Lane:
    """Jobs of one transfer that must run in order: one at a time in the file thread pool.

    `submit` waits for the previous job before queuing the next, so at most one job per lane is
    in flight (memory stays flat) and its failure surfaces at the next submit or at `drain`. The
    concurrent future is kept, not only its asyncio wrapper: a cancelled call cancels the wrapper
    at once while the thread still runs, and resources must be released only after the thread.
    """

    def __init__(self) -> None:
        self.job: concurrent.futures.Future[Any] | None = None

    async def submit(self, fn: Callable[..., object], *args: object) -> None:
        await self.drain()
        self.job = _POOL.submit(fn, *args)

    async def drain(self) -> Any:
        """Wait for the job in flight; returns its result (None when there is none)."""
        if self.job is None:
            return None
        # A job already done is collected without a trip through the event loop (wrapping it
        # would still cost a wake-up of the loop and a turn of it per chunk).
        result = self.job.result() if self.job.done() else await asyncio.wrap_future(self.job)
        self.job = None
        return result


async def _settle(lanes: list[_Lane]) -> None:
    """Wait until no job of `lanes` is running (their errors are not raised: they were, or do not matter)."""
    running = [asyncio.wrap_future(lane.job) for lane in lanes if lane.job is not None and not lane.job.done()]
    if running:
        await asyncio.wait(running)
        for future in running:
            future.exception()  # Retrieved, so asyncio does not log it as never retrieved.


def _when_idle(lanes: list[_Lane], release: Callable[[], None]) -> None:
    """Call `release` now, or once the jobs still running in `lanes` have finished (in their thread)."""
    running = [lane.job for lane in lanes if lane.job is not None and not lane.job.done()]
    if not running:
        release()
        return
    left = [len(running)]
    lock = threading.Lock()

    def one_done(_: object) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            release()

    for job in running:
        job.add_done_callback(one_done)


def _hash_prefix(fd: int, size: int) -> hashlib._Hash:
    """sha256 of the first `size` bytes of `fd` (a resumed upload's partial file)."""
    digest = hashlib.sha256()
    position = 0
    while position < size:
        block = os.pread(fd, min(DOWNLOAD_CHUNK, size - position), position)
        if not block:
            break
        digest.update(block)
        position += len(block)
    return digest


def _resolve_target(path: str) -> str:
    """The file an upload to `path` writes: the end of the symlink chain when `path` is a link."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return os.path.realpath(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise os_error(err, path, "inspect") from None
    return path


class _Upload:
    """State of one upload: the open temporary file, its running hash and where it goes.

    Only the task of the call touches it; writes run in the thread pool one at a time (the call
    awaits each before queuing the next), so the descriptor is never used by two threads at once.
    """

    def __init__(self, header: filesystem_pb2.UploadFileHeader) -> None:
        self.requested = require_absolute(header.path, "header.path")
        check_upload_id(header.upload_id)
        self.expected = check_sha256(header.expected_sha256, "header.expected_sha256")
        if header.offset < 0:
            raise invalid_argument(f"header.offset must be >= 0, got {header.offset}")
        if header.offset and not header.upload_id:
            raise invalid_argument("header.offset needs header.upload_id: only a named upload can be resumed")
        if header.mode > 0o7777:
            raise invalid_argument(f"header.mode must be permission bits (at most 0o7777), got {oct(header.mode)}")
        self.header = header
        self.mode = header.mode or 0o644
        self.target = _resolve_target(self.requested)
        self.temp = temp_name(self.target, header.upload_id or secrets.token_hex(8))
        self.keep_partial = bool(header.upload_id)
        self.fd = -1
        self.size = 0
        self.written_back = 0  # Bytes below this offset have had their writeback started.
        self.digest = hashlib.sha256()

    def prepare(self) -> None:
        """Check the target, create parents if asked, open (or reopen and trim) the temporary file."""
        header, target = self.header, self.target
        try:
            st = os.stat(target)
        except FileNotFoundError:
            st = None
        except OSError as err:
            raise os_error(err, target, "inspect") from None
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                raise failed_precondition(f"{target} is a directory; uploads write files")
            if not header.overwrite:
                raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"{target} already exists (set overwrite to replace it)")
        parent = os.path.dirname(target)
        if not os.path.isdir(parent):
            if os.path.lexists(parent) and not os.path.isdir(parent):
                raise failed_precondition(f"cannot upload to {target}: {parent} is not a directory")
            if not header.create_parents:
                raise not_found(f"directory {parent} does not exist (set create_parents to create it)")
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as err:
                raise os_error(err, parent, "create directory") from None
        offset = header.offset
        # Resuming needs the partial file; a fresh upload (offset 0) starts a new one.
        flags = os.O_RDWR | os.O_CLOEXEC | (0 if offset else os.O_CREAT)
        try:
            self.fd = os.open(self.temp, flags, 0o600)
        except FileNotFoundError:
            if offset:
                raise failed_precondition(
                    f"no interrupted upload {header.upload_id} of {target} is stored; start again from offset 0"
                ) from None
            raise not_found(f"directory {parent} does not exist") from None
        except OSError as err:
            raise os_error(err, parent, "write in") from None
        partial = os.fstat(self.fd).st_size
        if partial < offset:
            raise failed_precondition(
                f"upload {header.upload_id} has {partial} bytes stored, fewer than offset {offset}; "
                f"resume from offset {partial}"
            )
        try:
            os.ftruncate(self.fd, offset)
            os.lseek(self.fd, offset, os.SEEK_SET)
        except OSError as err:
            raise os_error(err, self.temp, "truncate") from None
        self.size = self.written_back = offset
        if offset:
            self.digest = _hash_prefix(self.fd, offset)

    def write(self, chunk: bytes) -> None:
        """Append `chunk` (runs in the thread pool; the hash is updated separately, see UploadFile)."""
        try:
            _write_all(self.fd, chunk)
        except OSError as err:
            raise os_error(err, self.target, "write") from None
        self.size += len(chunk)
        if self.size - self.written_back >= WRITEBACK_EVERY:
            start_writeback(self.fd, self.written_back, self.size - self.written_back)
            self.written_back = self.size

    def commit(self) -> str:
        """Check the hash, make the bytes durable and put them under the target name; returns the hex digest."""
        sha = self.digest.hexdigest()
        if self.expected and sha != self.expected:
            self.keep_partial = False
            raise RpcError(
                grpc.StatusCode.DATA_LOSS,
                f"content of {self.target} has sha256 {sha}, not the expected {self.expected}; nothing was written",
            )
        try:
            os.fchmod(self.fd, self.mode)
            # fsync before the rename: otherwise a crash could leave an empty file under the target name.
            os.fsync(self.fd)
        except OSError as err:
            raise os_error(err, self.target, "write") from None
        os.close(self.fd)
        self.fd = -1
        try:
            if self.header.overwrite:
                os.replace(self.temp, self.target)
            else:
                self._link_no_clobber()
        except OSError as err:
            raise os_error(err, self.target, "write") from None
        self.keep_partial = False
        return sha

    def _link_no_clobber(self) -> None:
        # link(2) fails with EEXIST if the target appeared meanwhile: no overwrite, even under a race.
        try:
            os.link(self.temp, self.target)
        except FileExistsError:
            raise RpcError(
                grpc.StatusCode.ALREADY_EXISTS, f"{self.target} already exists (set overwrite to replace it)"
            ) from None
        except OSError:
            # File systems without hard links: check then rename (a narrow race, as cp -n has).
            if os.path.lexists(self.target):
                raise RpcError(
                    grpc.StatusCode.ALREADY_EXISTS, f"{self.target} already exists (set overwrite to replace it)"
                ) from None
            os.rename(self.temp, self.target)
            return
        os.unlink(self.temp)

    def cleanup(self) -> None:
        """Close the descriptor; drop the temporary file unless a named upload may resume it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.keep_partial:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)


class FilesystemServicer(filesystem_pb2_grpc.FilesystemServiceServicer):
    """Serves cyberdesk.v1.FilesystemService inside an instance."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        # Megabyte messages otherwise cost a page-faulting mmap per allocation (see cyberdesk._malloc).
        keep_large_blocks()
        # Temporary files of uploads in progress: a second upload with the same upload_id to the
        # same place would interleave with the first.
        self._active: set[str] = set()

    async def UploadFile(
        self,
        request_iterator: AsyncIterator[filesystem_pb2.UploadFileRequest],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> filesystem_pb2.UploadFileResponse:
        """Receive a header then chunks; write them to a temporary file and rename it onto the target."""
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("data") != "header":
            raise invalid_argument("the first message of an upload must carry the header (path, mode, ...)")
        self._identity.check(first.instance_id)
        upload = _Upload(first.header)
        if upload.temp in self._active:
            raise RpcError(grpc.StatusCode.ABORTED, f"upload {first.header.upload_id} is already in progress")
        self._active.add(upload.temp)
        # Hashing and writing run side by side, each in its own lane (hashlib and os.write release
        # the GIL, so on two cores they really overlap), while the event loop receives the next chunk.
        hashing, writing = _Lane(), _Lane()
        cancelled = False
        try:
            await _io(upload.prepare)
            async for message in messages:
                if message.WhichOneof("data") == "header":
                    raise invalid_argument("only the first message of an upload may carry a header")
                chunk = message.chunk
                if not chunk:
                    continue
                await hashing.submit(upload.digest.update, chunk)
                await writing.submit(upload.write, chunk)
            await hashing.drain()
            await writing.drain()
            sha = await _io(upload.commit)
            return filesystem_pb2.UploadFileResponse(path=upload.target, size=upload.size, sha256=sha)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:

            def release() -> None:
                upload.cleanup()
                self._active.discard(upload.temp)

            # On an error (a full disk, a bad message) the other lane may still be busy: wait for
            # it, so the temporary file is gone before the caller sees the status. A cancelled
            # call cannot wait: it cleans up once the threads are done, so the descriptor is
            # never closed under a running write.
            try:
                if not cancelled:
                    await _settle([hashing, writing])
            finally:
                _when_idle([hashing, writing], release)

    async def DownloadFile(
        self,
        request: filesystem_pb2.DownloadFileRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[filesystem_pb2.DownloadFileResponse]:
        """Stream a file, or the range [offset, offset+length), in chunks; the last carries the sha256."""
        self._identity.check(request.instance_id)
        path = require_absolute(request.path, "path")
        if request.offset < 0:
            raise invalid_argument(f"offset must be >= 0, got {request.offset}")
        if request.length < 0:
            raise invalid_argument(f"length must be >= 0 (0 means to the end), got {request.length}")
        try:
            fd = await _io(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise os_error(err, path, "read") from None
        reader = _Lane()
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise failed_precondition(f"{path} is a directory; list it instead of downloading it")
            if not stat.S_ISREG(st.st_mode):
                raise failed_precondition(f"{path} is not a regular file")
            total = st.st_size
            if request.offset > total:
                raise RpcError(
                    grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end of {path} ({total} bytes)"
                )
            end = total if request.length == 0 else min(total, request.offset + request.length)
            digest = hashlib.sha256()

            def read(position: int) -> bytes:
                # Hashing here, not on the event loop, overlaps it with sending the previous
                # chunk (hashlib releases the GIL). One read is in flight at a time, so the
                # digest is updated in file order.
                try:
                    chunk = os.pread(fd, min(DOWNLOAD_CHUNK, end - position), position)
                except OSError as err:
                    raise os_error(err, path, "read") from None
                digest.update(chunk)
                return chunk

            position = request.offset
            first = True
            if position < end:
                await reader.submit(read, position)
            while reader.job is not None:
                chunk = await reader.drain()
                if not chunk:
                    # The file shrank while being read: send what there was, hashed as sent.
                    break
                position += len(chunk)
                # Read the next chunk while this one goes out.
                if position < end:
                    await reader.submit(read, position)
                last = reader.job is None
                yield filesystem_pb2.DownloadFileResponse(
                    chunk=chunk,
                    total_size=total if first else 0,
                    sha256=digest.hexdigest() if last else "",
                )
                first = False
                if last:
                    return
            yield filesystem_pb2.DownloadFileResponse(total_size=total if first else 0, sha256=digest.hexdigest())
        finally:
            # A read may still run in a thread when the call is cancelled: close after it.
            _when_idle([reader], lambda: os.close(fd))

    async def StatPath(
        self,
        request: filesystem_pb2.StatPathRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> filesystem_pb2.StatPathResponse:
        """Metadata of a path; a symlink is described itself, with its target."""
        self._identity.check(request.instance_id)
        path = require_absolute(request.path, "path")
        try:
            st = await _io(os.lstat, path)
        except OSError as err:
            raise os_error(err, path, "stat") from None
        return filesystem_pb2.StatPathResponse(info=file_info(path, st))

    async def ListDirectory(
        self,
        request: filesystem_pb2.ListDirectoryRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> filesystem_pb2.ListDirectoryResponse:
        """Entries below a directory down to `depth` levels (default 1), sorted by path."""
        self._identity.check(request.instance_id)
        path = require_absolute(request.path, "path")
        if request.depth < 0:
            raise invalid_argument(f"depth must be >= 1 (0 means 1), got {request.depth}")
        entries = await _io(_list, path, request.depth or 1)
        return filesystem_pb2.ListDirectoryResponse(entries=entries)

    async def MakeDirectory(
        self,
        request: filesystem_pb2.MakeDirectoryRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> filesystem_pb2.MakeDirectoryResponse:
        """Create a directory; with `parents`, its missing parents too, and an existing one is fine."""
        self._identity.check(request.instance_id)
        path = require_absolute(request.path, "path")
        if request.mode > 0o7777:
            raise invalid_argument(f"mode must be permission bits (at most 0o7777), got {oct(request.mode)}")
        st = await _io(_make_directory, path, request.parents, request.mode or 0o755)
        return filesystem_pb2.MakeDirectoryResponse(info=file_info(path, st))

    async def MovePath(
        self,
        request: filesystem_pb2.MovePathRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> filesystem_pb2.MovePathResponse:
        """Rename a file or directory; across file systems it is copied then removed."""
        self._identity.check(request.instance_id)
        source = require_absolute(request.source, "source")
        destination = require_absolute(request.destination, "destination")
        st = await _io(_move, source, destination, request.overwrite)
        return filesystem_pb2.MovePathResponse(info=file_info(destination, st))

    async def RemovePath(
        self,
        request: filesystem_pb2.RemovePathRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> filesystem_pb2.RemovePathResponse:
        """Remove a file, a symlink (not its target), or a directory (`recursive` unless empty)."""
        self._identity.check(request.instance_id)
        path = require_absolute(request.path, "path")
        if path == "/":
            raise invalid_argument("refusing to remove /")
        await _io(_remove, path, request.recursive)
        return filesystem_pb2.RemovePathResponse()

    async def WatchDirectory(
        self,
        request: filesystem_pb2.WatchDirectoryRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[filesystem_pb2.WatchDirectoryResponse]:
        """`started` once the watch is in place, then one message per change below the directory."""
        self._identity.check(request.instance_id)
        path = require_absolute(request.path, "path")
        async for message in watch_directory(path, request.recursive):
            yield message


def _list(root: str, depth: int) -> list[filesystem_pb2.FileInfo]:
    try:
        st = os.stat(root)
    except OSError as err:
        raise os_error(err, root, "list") from None
    if not stat.S_ISDIR(st.st_mode):
        raise failed_precondition(f"{root} is not a directory; stat it instead of listing it")
    entries: list[filesystem_pb2.FileInfo] = []
    level = [root]
    for current_depth in range(depth):
        below: list[str] = []
        for directory in level:
            try:
                with os.scandir(directory) as scan:
                    items = list(scan)
            except OSError as err:
                if directory == root:
                    raise os_error(err, root, "list") from None
                continue  # A subdirectory vanished or is unreadable: list what can be read.
            for item in items:
                try:
                    item_st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                entries.append(file_info(item.path, item_st))
                # Symlinked directories are not descended: they can loop and leave the tree.
                if current_depth + 1 < depth and stat.S_ISDIR(item_st.st_mode):
                    below.append(item.path)
            if len(entries) > MAX_LIST_ENTRIES:
                raise failed_precondition(
                    f"{root} has more than {MAX_LIST_ENTRIES} entries at depth {depth}; list with a smaller depth"
                )
        level = below
    entries.sort(key=lambda info: info.path)
    return entries


def _make_directory(path: str, parents: bool, mode: int) -> os.stat_result:
    try:
        if parents:
            os.makedirs(path, mode, exist_ok=True)
        else:
            os.mkdir(path, mode)
    except FileExistsError:
        if os.path.isdir(path):
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"directory {path} already exists") from None
        raise failed_precondition(f"{path} exists and is not a directory") from None
    except FileNotFoundError:
        raise not_found(f"parent of {path} does not exist (set parents to create it)") from None
    except OSError as err:
        raise os_error(err, path, "create directory") from None
    return os.lstat(path)


def _move(source: str, destination: str, overwrite: bool) -> os.stat_result:
    try:
        source_st = os.lstat(source)
    except OSError as err:
        raise os_error(err, source, "move") from None
    if source == destination:
        return source_st
    try:
        dest_st: os.stat_result | None = os.lstat(destination)
    except FileNotFoundError:
        dest_st = None
    except OSError as err:
        raise os_error(err, destination, "move onto") from None
    if dest_st is not None:
        if not overwrite:
            raise RpcError(
                grpc.StatusCode.ALREADY_EXISTS, f"{destination} already exists (set overwrite to replace it)"
            )
        if stat.S_ISDIR(dest_st.st_mode) and not stat.S_ISDIR(source_st.st_mode):
            raise failed_precondition(f"cannot replace directory {destination} with file {source}")
        if stat.S_ISDIR(source_st.st_mode) and not stat.S_ISDIR(dest_st.st_mode):
            raise failed_precondition(f"cannot replace file {destination} with directory {source}")
    if not os.path.isdir(os.path.dirname(destination)):
        raise not_found(f"directory {os.path.dirname(destination)} does not exist")
    try:
        os.replace(source, destination)
    except OSError as err:
        if err.errno != errno.EXDEV:  # Another file system, where rename cannot work.
            raise os_error(err, f"{source} to {destination}", "move") from None
        try:
            shutil.move(source, destination)
        except OSError as copy_err:
            raise os_error(copy_err, f"{source} to {destination}", "move") from None
    return os.lstat(destination)


def _remove(path: str, recursive: bool) -> None:
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
        elif recursive:
            shutil.rmtree(path)
        else:
            os.rmdir(path)
    except OSError as err:
        raise os_error(err, path, "remove") from None
