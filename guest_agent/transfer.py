"""The transfer engine of FilesystemService: chunked upload and download with sha256.

Memory stays flat whatever the file size: an upload writes each chunk as it arrives and a download
reads one chunk ahead, so at most three chunks per transfer are in memory. Disk I/O and hashing run
in a thread pool (both release the GIL), overlapped with the network: while chunk N is hashed and,
in parallel, written, chunk N+1 is being received; while chunk N is sent, chunk N+1 is read and
hashed (the lanes of `transfer_lanes`).

Uploads are atomic: bytes go to a temporary file in the target's directory, which is renamed onto
the target only once the caller's trailer has arrived and its size and sha256 match what was
stored (and `expected_sha256`, when set). The end of the request stream is not enough: a caller
that dies between messages can reach the agent as a clean half-close (grpc.aio ends the request
iterator normally before it cancels the handler, and a proxy may pass the end on), so without the
trailer nothing is committed. Writing to a path that is a symbolic link replaces the file the link
points to and keeps the link, as `echo > link` would. A named upload (`upload_id`) that is
interrupted keeps its temporary file for PARTIAL_KEEP_SECONDS, so it can resume from the offset it
reached (`stat_upload` reports it); its final sha256 covers the whole file. An upload that does not fit the instance's
disk (ENOSPC, EDQUOT) is RESOURCE_EXHAUSTED naming the disk's size, and its temporary file is
removed, named or not: the target keeps its old content and no partial file holds space.
Downloads may ask for a range; the last message carries the sha256 of the bytes sent and, when
asked, of the whole file (a resumed download's check).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import secrets
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc

from cyberdesk_common.status import RpcError, failed_precondition, invalid_argument, not_found
from cyberdesk_proto.v1 import filesystem_pb2
from guest_agent.fs_errors import os_error, require_absolute
from guest_agent.transfer_lanes import Lane, settle, when_idle

# 1 MiB: a bare grpc.aio server streaming protobuf messages to a client over a unix socket (no
# hashing, no disk) peaked at 1 MiB here: ~1,370 MB/s against ~1,080 at 256 KiB, ~1,030 at 4 MiB
# and ~950 at 8 MiB (larger messages fall out of the CPU caches). The SDK uploads 1 MiB chunks too.
DOWNLOAD_CHUNK = 1024 * 1024
# An upload asks the kernel to start writing back every this many bytes (see start_writeback).
WRITEBACK_EVERY = 16 * 1024 * 1024


_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


def check_upload_id(upload_id: str) -> None:
    """INVALID_ARGUMENT unless `upload_id` is empty or 8-64 of [A-Za-z0-9_-]."""
    if upload_id and not _UPLOAD_ID.fullmatch(upload_id):
        raise invalid_argument("header.upload_id must be 8-64 characters of [A-Za-z0-9_-]")


def check_sha256(value: str, field: str) -> str:
    """`value` lower-cased, or INVALID_ARGUMENT unless it is empty or 64 hex digits."""
    if value and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise invalid_argument(f"{field} must be 64 hexadecimal digits (a sha256), got {value!r}")
    return value.lower()


def temp_name(target: str, token: str) -> str:
    """The temporary path an upload to `target` writes before the rename.

    It sits in the target's directory (same file system, so the rename is atomic) and starts with
    a dot so directory listings of tools stay clean. The target's name is shortened so the whole
    stays under NAME_MAX (255 bytes) whatever the name.
    """
    directory, name = os.path.split(target)
    short = name.encode()[:120].decode(errors="ignore")
    return os.path.join(directory, f".{short}.cyberdesk-upload-{token}")


# sync_file_range(2) is not in the os module. SYNC_FILE_RANGE_WRITE starts writeback of the range
# without waiting for it (from linux/fs.h).
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing [offset, offset+length) of `fd` to disk, without waiting.

    An upload calls it as it goes so the disk works while bytes still arrive: the fsync before
    the rename then waits for the last few MiB instead of the whole file (0.01 s instead of
    0.35 s for 1 GiB here). Best effort: where the call is missing or fails, fsync does it all.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _hash_prefix(fd: int, size: int, digest: hashlib._Hash | None = None) -> hashlib._Hash:
    """`digest` (a new sha256 by default) updated with the first `size` bytes of `fd`.

    A resumed upload's partial file, or the bytes before a resumed download's offset.
    """
    if digest is None:
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


class Upload:
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
            # The temporary file is an implementation detail: the caller asked to write the target.
            raise os_error(err, target, "write") from None
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
        """Append `chunk` (runs in the thread pool; the hash is updated separately, see `TransferEngine.upload`)."""
        try:
            _write_all(self.fd, chunk)
        except OSError as err:
            self._drop_partial_if_full(err)
            raise os_error(err, self.target, "write") from None
        self.size += len(chunk)
        if self.size - self.written_back >= WRITEBACK_EVERY:
            start_writeback(self.fd, self.written_back, self.size - self.written_back)
            self.written_back = self.size

    def commit(self, trailer: filesystem_pb2.UploadFileTrailer) -> str:
        """Check the trailer and the hash, make the bytes durable and put them under the target name.

        Returns the hex digest. A mismatch drops the partial file even of a named upload: bytes
        that do not add up to what the caller says it sent are no base to resume from.
        """
        sha = self.digest.hexdigest()
        if trailer.size != self.size:
            self.keep_partial = False
            raise RpcError(
                grpc.StatusCode.DATA_LOSS,
                f"the trailer of the upload to {self.target} says {trailer.size} bytes but {self.size} arrived; "
                "nothing was written",
            )
        claimed = check_sha256(trailer.sha256, "trailer.sha256")
        for what, wanted in (("the trailer's", claimed), ("the expected", self.expected)):
            if wanted and sha != wanted:
                self.keep_partial = False
                raise RpcError(
                    grpc.StatusCode.DATA_LOSS,
                    f"content of {self.target} has sha256 {sha}, not {what} {wanted}; nothing was written",
                )
        try:
            os.fchmod(self.fd, self.mode)
            # fsync before the rename: otherwise a crash could leave an empty file under the target name.
            os.fsync(self.fd)
        except OSError as err:
            self._drop_partial_if_full(err)
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

    def _drop_partial_if_full(self, err: OSError) -> None:
        # A full disk is no interruption to resume from: the partial file would only hold the
        # space the retry needs. It goes even for a named upload (the caller sees RESOURCE_EXHAUSTED).
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            self.keep_partial = False

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
        # The target is in place; a temporary name left behind would only be clutter.
        with contextlib.suppress(OSError):
            os.unlink(self.temp)

    def cleanup(self) -> None:
        """Close the descriptor; drop the temporary file unless a named upload may resume it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.keep_partial:
            # Any OSError, not only a missing file: on a read-only file system unlink(2) fails with
            # EROFS even for a name that does not exist (the mount is checked before the lookup),
            # and raised here, from a `finally`, it replaced the meaningful status with INTERNAL.
            with contextlib.suppress(OSError):
                os.unlink(self.temp)


# How long the partial file of an interrupted named upload waits for its resume: long enough for
# a client to come back after a gateway restart or a network change (the SDK gives up after about
# 20 s of tries), short enough that uploads abandoned for good (a client killed, every SDK upload
# of a file is named) do not pile up hidden files in the tenant's directories. An agent restarted
# in between forgets the timer and the file stays.
PARTIAL_KEEP_SECONDS = 15 * 60


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class TransferEngine:
    """Uploads and downloads of one agent; remembers which uploads are in progress."""

    def __init__(self, partial_keep: float = PARTIAL_KEEP_SECONDS) -> None:
        # Temporary files of uploads in progress: a second upload with the same upload_id to the
        # same place would interleave with the first.
        self._active: set[str] = set()
        # Partial files of interrupted named uploads -> the timer that removes them unless resumed.
        # Touched on the event loop only (a release in a worker thread hands over with
        # call_soon_threadsafe).
        self._partial_keep = partial_keep
        self._expiry: dict[str, asyncio.TimerHandle] = {}

    def _keep_for_resume(self, loop: asyncio.AbstractEventLoop, temp: str) -> None:
        if temp in self._active:
            return  # a resume started meanwhile
        old = self._expiry.pop(temp, None)
        if old is not None:
            old.cancel()
        self._expiry[temp] = loop.call_later(self._partial_keep, self._expire, loop, temp)

    def _expire(self, loop: asyncio.AbstractEventLoop, temp: str) -> None:
        self._expiry.pop(temp, None)
        if temp not in self._active:
            loop.run_in_executor(None, _unlink_quietly, temp)

    async def upload(
        self, header: filesystem_pb2.UploadFileHeader, chunks: AsyncIterator[filesystem_pb2.UploadFileRequest]
    ) -> filesystem_pb2.UploadFileResponse:
        """Write the `chunks` of the upload `header` describes to a temporary file, then rename it onto the target."""
        upload = Upload(header)
        if upload.temp in self._active:
            raise RpcError(grpc.StatusCode.ABORTED, f"upload {header.upload_id} is already in progress")
        self._active.add(upload.temp)
        timer = self._expiry.pop(upload.temp, None)
        if timer is not None:
            timer.cancel()  # resumed: the partial file is in use again
        loop = asyncio.get_running_loop()
        # Hashing and writing run side by side, each in its own lane (hashlib and os.write release
        # the GIL, so on two cores they really overlap), while the event loop receives the next chunk.
        hashing, writing = Lane(), Lane()
        cancelled = False
        try:
            await asyncio.to_thread(upload.prepare)
            trailer: filesystem_pb2.UploadFileTrailer | None = None
            async for message in chunks:
                kind = message.WhichOneof("data")
                if kind == "header":
                    raise invalid_argument("only the first message of an upload may carry a header")
                if kind == "trailer":
                    # The caller's explicit end: what follows it, if anything, is not read.
                    trailer = message.trailer
                    break
                chunk = message.chunk
                if not chunk:
                    continue
                await hashing.submit(upload.digest.update, chunk)
                await writing.submit(upload.write, chunk)
            await hashing.drain()
            await writing.drain()
            if trailer is None:
                raise RpcError(grpc.StatusCode.ABORTED, self._unfinished(upload))
            sha = await asyncio.to_thread(upload.commit, trailer)
            return filesystem_pb2.UploadFileResponse(path=upload.target, size=upload.size, sha256=sha)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:

            def release() -> None:
                upload.cleanup()
                self._active.discard(upload.temp)
                if upload.keep_partial:
                    # Possibly in a worker thread (see when_idle); the loop is gone at shutdown.
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(self._keep_for_resume, loop, upload.temp)

            # On an error (a full disk, a bad message) the other lane may still be busy: wait for
            # it, so the temporary file is gone before the caller sees the status. A cancelled
            # call cannot wait: it cleans up once the threads are done, so the descriptor is
            # never closed under a running write.
            try:
                if not cancelled:
                    await settle([hashing, writing])
            finally:
                when_idle([hashing, writing], release)

    @staticmethod
    def _unfinished(upload: Upload) -> str:
        what = f"the upload to {upload.target} ended before its trailer (size and sha256); the target is unchanged"
        if upload.keep_partial:
            return f"{what}; {upload.size} bytes are kept under upload_id {upload.header.upload_id}: resume from there"
        return f"{what} and the bytes sent were discarded"

    async def stat_upload(self, path: str, upload_id: str) -> int:
        """Bytes stored by the interrupted named upload `upload_id` to `path`: the offset to resume from."""
        requested = require_absolute(path, "path")
        if not upload_id:
            raise invalid_argument("upload_id is required")
        check_upload_id(upload_id)
        target = await asyncio.to_thread(_resolve_target, requested)
        temp = temp_name(target, upload_id)
        if temp in self._active:
            # Its last write may still be landing (a cancelled call releases once its lanes are
            # idle): a size read now could be stale by the time the caller resumes.
            raise RpcError(grpc.StatusCode.ABORTED, f"upload {upload_id} of {target} is still in progress; ask again")
        try:
            st = await asyncio.to_thread(os.stat, temp)
        except FileNotFoundError:
            raise not_found(f"no interrupted upload {upload_id} of {target} is stored") from None
        except OSError as err:
            raise os_error(err, target, "inspect the upload to") from None
        return st.st_size

    async def download(
        self, request: filesystem_pb2.DownloadFileRequest
    ) -> AsyncGenerator[filesystem_pb2.DownloadFileResponse, None]:
        """Stream a file, or the range [offset, offset+length), in chunks; the last carries the sha256."""
        path = require_absolute(request.path, "path")
        if request.offset < 0:
            raise invalid_argument(f"offset must be >= 0, got {request.offset}")
        if request.length < 0:
            raise invalid_argument(f"length must be >= 0 (0 means to the end), got {request.length}")
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise os_error(err, path, "read") from None
        reader = Lane()
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
            # The whole file's hash: from offset 0 it is the hash of the bytes sent; from further on,
            # the bytes before the offset are hashed first (read again, in the reading lane), then
            # every chunk sent goes into both.
            whole: hashlib._Hash | None = None
            if request.file_sha256 and end == total and request.offset > 0:
                whole = hashlib.sha256()

            def prefix() -> None:
                assert whole is not None
                try:
                    _hash_prefix(fd, request.offset, whole)
                except OSError as err:
                    raise os_error(err, path, "read") from None

            def read(position: int) -> bytes:
                # Hashing here, not on the event loop, overlaps it with sending the previous
                # chunk (hashlib releases the GIL). One read is in flight at a time, so the
                # digest is updated in file order.
                try:
                    chunk = os.pread(fd, min(DOWNLOAD_CHUNK, end - position), position)
                except OSError as err:
                    raise os_error(err, path, "read") from None
                digest.update(chunk)
                if whole is not None:
                    whole.update(chunk)
                return chunk

            def file_sha() -> str:
                if not request.file_sha256 or end != total:
                    return ""
                return (whole or digest).hexdigest()

            position = request.offset
            first = True
            if whole is not None:
                await reader.submit(prefix)
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
                    file_sha256=file_sha() if last else "",
                )
                first = False
                if last:
                    return
            await reader.drain()  # The prefix's hash, when nothing after it was to be sent.
            yield filesystem_pb2.DownloadFileResponse(
                total_size=total if first else 0, sha256=digest.hexdigest(), file_sha256=file_sha()
            )
        finally:
            # A read may still run in a thread when the call is cancelled: close after it.
            when_idle([reader], lambda: os.close(fd))
