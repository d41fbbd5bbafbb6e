"""Operations on the directory tree of FilesystemService: stat, list, make directory, move, remove.

Blocking functions on the local file system (the servicer runs them in a thread), with no gRPC
call around them, so they can be tested on a temporary directory. Each failure becomes the status
`fs_errors.os_error` gives its errno, or a clearer one where the cause is known before the call
(an existing destination, a file where a directory was expected).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat

import grpc

from cyberdesk_common.status import RpcError, failed_precondition, not_found
from cyberdesk_proto.v1 import filesystem_pb2
from guest_agent.fs_errors import os_error

# ListDirectory answers in one message: past this many entries ask for a smaller depth.
MAX_LIST_ENTRIES = 50_000


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


def stat_path(path: str) -> os.stat_result:
    """The lstat of `path`: a symlink is described itself."""
    try:
        return os.lstat(path)
    except OSError as err:
        raise os_error(err, path, "stat") from None


def list_tree(root: str, depth: int) -> list[filesystem_pb2.FileInfo]:
    """Entries below directory `root` down to `depth` levels, sorted by path (symlinks not followed)."""
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


def make_directory(path: str, parents: bool, mode: int) -> os.stat_result:
    """Create directory `path` (with `parents`, its missing parents, and an existing one is fine); its lstat."""
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


def move_path(source: str, destination: str, overwrite: bool) -> os.stat_result:
    """Rename `source` onto `destination` (copy then remove across file systems); the result's lstat."""
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


def remove_path(path: str, recursive: bool) -> None:
    """Remove a file, a symlink (not its target), or a directory (`recursive` unless empty)."""
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
