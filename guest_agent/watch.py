"""Directory watches on Linux inotify, through ctypes (the agent has no dependency for this).

One inotify descriptor per watch call. The descriptor is read only when the stream's consumer
asks for more, so a slow client applies back-pressure down to the kernel queue; if that queue
overflows the stream ends with ABORTED (events were lost) rather than silently skipping changes.

A rename inside the watched tree is one IN_MOVED_FROM and one IN_MOVED_TO with the same cookie,
adjacent in the kernel queue; they are paired into one RENAME event. A lone IN_MOVED_FROM (moved
out of the tree) becomes REMOVE, a lone IN_MOVED_TO (moved in) becomes CREATE.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import stat
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from cyberdesk_common.status import RpcError, failed_precondition, resource_exhausted
from cyberdesk_proto.v1 import filesystem_pb2
from guest_agent.fs_errors import os_error

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of NUL-padded name
# How long a lone IN_MOVED_FROM waits for its IN_MOVED_TO in a later read before it counts as a removal.
_MOVE_PAIR_SECONDS = 0.05
_READ_SIZE = 64 * 1024

Event = filesystem_pb2.FilesystemEvent


@dataclass(frozen=True)
class RawEvent:
    """One decoded inotify event."""

    wd: int
    mask: int
    cookie: int
    name: str


def parse_events(buffer: bytes) -> list[RawEvent]:
    """Decode a read(2) of an inotify descriptor."""
    events: list[RawEvent] = []
    offset = 0
    while offset + _HEADER.size <= len(buffer):
        wd, mask, cookie, length = _HEADER.unpack_from(buffer, offset)
        offset += _HEADER.size
        raw_name = buffer[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        events.append(RawEvent(wd, mask, cookie, os.fsdecode(raw_name)))
    return events


class _Inotify:
    """The libc inotify calls, or FAILED_PRECONDITION where they do not exist."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            self._init = libc.inotify_init1
            self._add = libc.inotify_add_watch
            self._rm = libc.inotify_rm_watch
        except (OSError, AttributeError):
            raise failed_precondition("file watching needs Linux inotify, which this instance does not have") from None
        self._init.argtypes = [ctypes.c_int]
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]

    def init(self) -> int:
        fd = int(self._init(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            code = ctypes.get_errno()
            if code == errno.EMFILE:
                raise resource_exhausted("too many directory watches in this instance (fs.inotify.max_user_instances)")
            raise failed_precondition(f"file watching is not available here: {os.strerror(code)}")
        return fd

    def add(self, fd: int, path: str) -> int:
        wd = int(self._add(fd, os.fsencode(path), _MASK))
        if wd < 0:
            code = ctypes.get_errno()
            if code == errno.ENOSPC:
                raise resource_exhausted(
                    f"cannot watch {path}: the instance's watch limit is reached (fs.inotify.max_user_watches)"
                )
            raise os_error(OSError(code, os.strerror(code)), path, "watch")
        return wd


class _Watch:
    """The watched tree: which descriptor stands for which directory."""

    def __init__(self, root: str, recursive: bool) -> None:
        self.root = root
        self.recursive = recursive
        self.lib = _Inotify()
        self.fd = self.lib.init()
        self.dirs: dict[int, str] = {}

    def close(self) -> None:
        os.close(self.fd)

    def add_tree(self, path: str, report: list[Event] | None) -> None:
        """Watch `path` (and, when recursive, every directory below it).

        Entries found below a directory that just appeared are reported as created into `report`:
        they may have been made before the watch on their parent existed.
        """
        try:
            wd = self.lib.add(self.fd, path)
        except RpcError as err:
            if path == self.root or err.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return  # Gone already, or not a directory any more: its own events say so.
        self.dirs[wd] = path
        if not self.recursive:
            return
        try:
            with os.scandir(path) as scan:
                items = list(scan)
        except OSError:
            return
        for item in items:
            is_dir = item.is_dir(follow_symlinks=False)
            if report is not None:
                report.append(_event(filesystem_pb2.FILESYSTEM_EVENT_TYPE_CREATE, item.path, is_dir))
            if is_dir:
                self.add_tree(item.path, report)

    def translate(self, raw: list[RawEvent], moved: dict[int, tuple[str, bool]]) -> tuple[list[Event], bool]:
        """Events for a batch of inotify events; `moved` holds unpaired IN_MOVED_FROM by cookie.

        Returns the events and whether the watched directory itself is gone.
        """
        out: list[Event] = []
        gone = False
        for item in raw:
            if item.mask & IN_Q_OVERFLOW:
                raise RpcError(
                    grpc.StatusCode.ABORTED,
                    "changes were lost (the kernel's event queue overflowed); list the directory and watch again",
                )
            directory = self.dirs.get(item.wd)
            if item.mask & IN_IGNORED:
                self.dirs.pop(item.wd, None)
                continue
            if directory is None:
                continue
            path = os.path.join(directory, item.name) if item.name else directory
            is_dir = bool(item.mask & IN_ISDIR)
            if item.mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                if directory == self.root:
                    out.append(_event(filesystem_pb2.FILESYSTEM_EVENT_TYPE_REMOVE, self.root, True))
                    gone = True
                # A subdirectory's own removal is reported by its parent's IN_DELETE / IN_MOVED_FROM.
                continue
            if item.mask & IN_CREATE:
                out.append(_event(filesystem_pb2.FILESYSTEM_EVENT_TYPE_CREATE, path, is_dir))
                if is_dir and self.recursive:
                    self.add_tree(path, out)
            elif item.mask & IN_MODIFY:
                last = out[-1] if out else None
                # One write(2) is one IN_MODIFY: a big file written in pieces would flood the stream.
                if not (last and last.type == filesystem_pb2.FILESYSTEM_EVENT_TYPE_MODIFY and last.path == path):
                    out.append(_event(filesystem_pb2.FILESYSTEM_EVENT_TYPE_MODIFY, path, is_dir))
            elif item.mask & IN_ATTRIB:
                out.append(_event(filesystem_pb2.FILESYSTEM_EVENT_TYPE_CHMOD, path, is_dir))
            elif item.mask & IN_DELETE:
                out.append(_event(filesystem_pb2.FILESYSTEM_EVENT_TYPE_REMOVE, path, is_dir))
            elif item.mask & IN_MOVED_FROM:
                moved[item.cookie] = (path, is_dir)
            elif item.mask & IN_MOVED_TO:
                source = moved.pop(item.cookie, None)
                if source is None:
                    out.append(_event(filesystem_pb2.FILESYSTEM_EVENT_TYPE_CREATE, path, is_dir))
                else:
                    event = _event(filesystem_pb2.FILESYSTEM_EVENT_TYPE_RENAME, path, is_dir)
                    event.old_path = source[0]
                    out.append(event)
                    if is_dir and self.recursive:
                        self._rename_dirs(source[0], path)
                if is_dir and self.recursive and source is None:
                    self.add_tree(path, out)
        return out, gone

    def _rename_dirs(self, old: str, new: str) -> None:
        # The watches of a moved directory stay valid; only the paths they stand for change.
        prefix = old + "/"
        for wd, path in list(self.dirs.items()):
            if path == old:
                self.dirs[wd] = new
            elif path.startswith(prefix):
                self.dirs[wd] = new + path[len(old) :]

    def forget_moved_out(self, moved: dict[int, tuple[str, bool]]) -> list[Event]:
        """REMOVE events for entries moved out of the tree (no IN_MOVED_TO came)."""
        out = [_event(filesystem_pb2.FILESYSTEM_EVENT_TYPE_REMOVE, path, is_dir) for path, is_dir in moved.values()]
        for path, is_dir in moved.values():
            if is_dir:
                prefix = path + "/"
                for wd, watched in list(self.dirs.items()):
                    if watched == path or watched.startswith(prefix):
                        del self.dirs[wd]
        moved.clear()
        return out


def _event(kind: filesystem_pb2.FilesystemEventType.ValueType, path: str, is_dir: bool) -> Event:
    event = Event(type=kind, path=path, is_directory=is_dir)
    event.event_time.GetCurrentTime()
    return event


async def _readable(fd: int, wait: float | None) -> bool:
    """Wait until `fd` can be read; False after `wait` seconds without data."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(fd, ready.set)
    try:
        if wait is None:
            await ready.wait()
            return True
        try:
            await asyncio.wait_for(ready.wait(), wait)
        except TimeoutError:
            return False
        return True
    finally:
        loop.remove_reader(fd)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, _READ_SIZE)
    except BlockingIOError:
        return b""


async def watch_directory(path: str, recursive: bool) -> AsyncIterator[filesystem_pb2.WatchDirectoryResponse]:
    """Stream `started`, then the changes below `path`, until the client goes away or `path` is removed."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise os_error(err, path, "watch") from None
    if not stat.S_ISDIR(st.st_mode):
        raise failed_precondition(f"{path} is not a directory; only directories can be watched")
    watch = _Watch(path, recursive)
    try:
        watch.add_tree(path, None)
        yield filesystem_pb2.WatchDirectoryResponse(started=filesystem_pb2.WatchStarted())
        moved: dict[int, tuple[str, bool]] = {}
        while True:
            # With a rename half seen, wait briefly for its second half before calling it a removal.
            has_data = await _readable(watch.fd, _MOVE_PAIR_SECONDS if moved else None)
            if not has_data:
                events = watch.forget_moved_out(moved)
                gone = False
            else:
                events, gone = watch.translate(parse_events(_read(watch.fd)), moved)
            for event in events:
                yield filesystem_pb2.WatchDirectoryResponse(change=event)
            if gone:
                return
    finally:
        watch.close()
