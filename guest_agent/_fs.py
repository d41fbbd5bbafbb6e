"""Helpers of the filesystem service: path checks, errno -> status, FileInfo, early writeback.

Every OSError raised by a filesystem call goes through `os_error`, so that one table decides
which gRPC status a failure becomes and every message names the path concerned.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import stat
from collections.abc import Callable

import grpc

from cyberdesk_common.status import RpcError, invalid_argument
from cyberdesk_proto.v1 import filesystem_pb2

# errno -> (status, what a person should understand). Anything missing here becomes UNKNOWN with
# the system's own text, never INTERNAL: the request reached the disk and the disk said no.
_ERRNO: dict[int, tuple[grpc.StatusCode, str]] = {
    errno.ENOENT: (grpc.StatusCode.NOT_FOUND, "no such file or directory"),
    errno.EEXIST: (grpc.StatusCode.ALREADY_EXISTS, "already exists"),
    errno.EACCES: (grpc.StatusCode.PERMISSION_DENIED, "permission denied"),
    errno.EPERM: (grpc.StatusCode.PERMISSION_DENIED, "operation not permitted"),
    errno.EROFS: (grpc.StatusCode.PERMISSION_DENIED, "read-only file system"),
    errno.ENOTDIR: (grpc.StatusCode.FAILED_PRECONDITION, "not a directory (a path component is a file)"),
    errno.EISDIR: (grpc.StatusCode.FAILED_PRECONDITION, "is a directory, a file was expected"),
    errno.ENOTEMPTY: (grpc.StatusCode.FAILED_PRECONDITION, "directory not empty (set recursive to remove it)"),
    errno.EBUSY: (grpc.StatusCode.FAILED_PRECONDITION, "busy (a mount point or in use)"),
    errno.ETXTBSY: (grpc.StatusCode.FAILED_PRECONDITION, "a running program's file"),
    errno.EXDEV: (grpc.StatusCode.FAILED_PRECONDITION, "on another file system"),
    errno.ENOSPC: (grpc.StatusCode.RESOURCE_EXHAUSTED, "no space left on device"),
    errno.EDQUOT: (grpc.StatusCode.RESOURCE_EXHAUSTED, "disk quota exceeded"),
    errno.EFBIG: (grpc.StatusCode.RESOURCE_EXHAUSTED, "file too large"),
    errno.EMFILE: (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open files in the agent"),
    errno.ENFILE: (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open files in the instance"),
    errno.ENAMETOOLONG: (grpc.StatusCode.INVALID_ARGUMENT, "name too long"),
    errno.ELOOP: (grpc.StatusCode.INVALID_ARGUMENT, "too many levels of symbolic links"),
    errno.EINVAL: (grpc.StatusCode.INVALID_ARGUMENT, "invalid (e.g. a directory moved into itself)"),
    errno.EIO: (grpc.StatusCode.UNAVAILABLE, "input/output error on the device"),
}


def os_error(err: OSError, path: str, action: str) -> RpcError:
    """The status of a failed filesystem call: `action` ("open", "remove", ...) on `path` failed with `err`."""
    code, text = _ERRNO.get(err.errno or 0, (grpc.StatusCode.UNKNOWN, err.strerror or str(err)))
    return RpcError(code, f"cannot {action} {path}: {text}")


def require_absolute(path: str, field: str) -> str:
    """`path` normalised (no `..`, no trailing slash), or INVALID_ARGUMENT naming `field`."""
    if not path:
        raise invalid_argument(f"{field} is required (an absolute path such as /home/user/file.txt)")
    if "\x00" in path:
        raise invalid_argument(f"{field} contains a NUL byte")
    if not path.startswith("/"):
        raise invalid_argument(f"{field} must be an absolute path (starting with /), got {path!r}")
    # normpath does not touch the disk; "//x" stays "//x" in POSIX, so strip leading doubles too.
    normal = os.path.normpath(path)
    return "/" + normal.lstrip("/")


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


def file_type(mode: int) -> filesystem_pb2.FileType.ValueType:
    """The FileType of an `st_mode`."""
    if stat.S_ISREG(mode):
        return filesystem_pb2.FILE_TYPE_FILE
    if stat.S_ISDIR(mode):
        return filesystem_pb2.FILE_TYPE_DIRECTORY
    if stat.S_ISLNK(mode):
        return filesystem_pb2.FILE_TYPE_SYMLINK
    return filesystem_pb2.FILE_TYPE_OTHER


def file_info(path: str, st: os.stat_result) -> filesystem_pb2.FileInfo:
    """FileInfo of `path` from its lstat result (reads the link target of a symlink)."""
    info = filesystem_pb2.FileInfo(
        path=path,
        name=os.path.basename(path) or "/",
        type=file_type(st.st_mode),
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode),
    )
    info.modify_time.FromNanoseconds(st.st_mtime_ns)
    if stat.S_ISLNK(st.st_mode):
        # Removed between lstat and readlink: the entry is still reported, without a target.
        with contextlib.suppress(OSError):
            info.symlink_target = os.readlink(path)
    return info


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
