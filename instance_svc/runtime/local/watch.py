"""Where a sandbox's death is noticed: pidfds of its agent and of its bubblewrap, read by the event loop.

A pidfd (pidfd_open(2)) becomes readable when its process exits, whoever its parent is, so the
same watch serves a sandbox this instance_svc spawned and one it re-adopted after a restart (whose
bubblewrap is init's child by then). No polling: the loop wakes only when a process ends. The
pidfd is opened first and the process's identity checked afterwards (start time of bubblewrap,
parent of the agent), so a pid reused while instance_svc was down is never watched in its place.

Why both processes: the agent (the sandbox's PID 1) is what callers use, and its end kills every
process of the sandbox (its pid namespace goes with it); the outer bubblewrap is what the runtime
counts a sandbox alive by (`LocalRuntime._alive`), and killed alone it leaves a sandbox nobody can
manage. Either ending is the sandbox's end.

How it ended: since Linux 6.15 the PIDFD_GET_INFO ioctl returns the wait status of a process that
has exited and been reaped, to any holder of its pidfd (the agent is reaped by bubblewrap at once);
on an older kernel the reason says only that it exited.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from instance_svc.runtime.local import procscan

_log = logging.getLogger("instance_svc.runtime.local")

# include/uapi/linux/pidfd.h: struct pidfd_info is 64 bytes in its first version; mask at 0,
# exit_code (a wait status) at 60. PIDFD_GET_INFO = _IOWR(0xFF, 11, struct pidfd_info).
_INFO_SIZE = 64
_INFO_EXIT = 1 << 3
_PIDFD_GET_INFO = (3 << 30) | (_INFO_SIZE << 16) | (0xFF << 8) | 11

ExitHandler = Callable[[str, str], None]


def exit_status(pidfd: int, wait: float = 0.5) -> int | None:
    """The wait status of the exited process behind `pidfd`, or None when the kernel cannot say (blocking).

    The status exists once the process is reaped, which trails its exit (when the pidfd became
    readable) by the reaper's reaction time: asked again for up to `wait` seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        buf = bytearray(_INFO_SIZE)
        struct.pack_into("Q", buf, 0, _INFO_EXIT)
        try:
            fcntl.ioctl(pidfd, _PIDFD_GET_INFO, buf)
        except OSError as err:
            if err.errno != 3:  # ESRCH: not reaped yet; anything else: no such ioctl here
                return None
        else:
            if struct.unpack_from("Q", buf, 0)[0] & _INFO_EXIT:
                return int(struct.unpack_from("i", buf, 60)[0])
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)


def describe(status: int | None) -> str:
    """' (killed by SIGKILL)', ' (exit status 1)' or '' for an unknown status."""
    if status is None:
        return ""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f" (killed by {name})"
    if os.WIFEXITED(status):
        return f" (exit status {os.WEXITSTATUS(status)})"
    return ""


@dataclass
class _Watch:
    sandbox_id: str
    on_exit: ExitHandler
    fds: dict[int, str] = field(default_factory=dict)  # pidfd -> "agent" or "bwrap"
    fired: bool = False


class Watcher:
    """The pidfd watches of one runtime's sandboxes; `on_exit(sandbox_id, reason)` runs once per watch, on the loop."""

    def __init__(self) -> None:
        self._watches: dict[str, _Watch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def watch(
        self,
        sandbox_id: str,
        agent_pid: int,
        bwrap_pid: int,
        bwrap_start: int,
        child: subprocess.Popen[bytes] | None,
        on_exit: ExitHandler,
    ) -> None:
        """Watch the sandbox (replacing an earlier watch of it); a process already gone is reported at once."""
        self.unwatch(sandbox_id)
        loop = asyncio.get_running_loop()
        w = _Watch(sandbox_id, on_exit)
        self._watches[sandbox_id] = w
        gone: str | None = None
        for role, pid in (("agent", agent_pid), ("bwrap", bwrap_pid)):
            try:
                fd = os.pidfd_open(pid) if pid > 0 else -1
            except OSError:
                fd = -1
            if fd < 0:
                gone = role
                break
            w.fds[fd] = role
            # The identity check comes after the open: from then on the pidfd names that process.
            if role == "bwrap" and procscan.start_time(pid) != bwrap_start:
                gone = role
                break
            if role == "agent" and procscan.parent(pid) != bwrap_pid:
                gone = role
                break
        if gone is not None:
            loop.call_soon(self._fire, w, -1, child)
            return
        for fd in w.fds:
            loop.add_reader(fd, self._fire, w, fd, child)

    def unwatch(self, sandbox_id: str) -> None:
        """Stop watching the sandbox (before its own teardown kills it); no handler runs for it."""
        w = self._watches.pop(sandbox_id, None)
        if w is None or w.fired:
            return  # a fired watch's fds belong to its report, which closes them
        w.fired = True
        loop = asyncio.get_running_loop()
        for fd in w.fds:
            loop.remove_reader(fd)
            os.close(fd)
        w.fds.clear()

    def watching(self) -> list[str]:
        """The sandboxes watched now."""
        return list(self._watches)

    def close(self) -> None:
        """Stop every watch."""
        for sandbox_id in list(self._watches):
            self.unwatch(sandbox_id)
        for task in self._tasks:
            task.cancel()

    def _fire(self, w: _Watch, fd: int, child: subprocess.Popen[bytes] | None) -> None:
        if w.fired or self._watches.get(w.sandbox_id) is not w:
            return
        w.fired = True
        loop = asyncio.get_running_loop()
        for watched in w.fds:
            loop.remove_reader(watched)
        task = loop.create_task(self._report(w, fd, child))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report(self, w: _Watch, fd: int, child: subprocess.Popen[bytes] | None) -> None:
        role = w.fds.get(fd, "")
        try:
            if child is not None:
                child.poll()  # our own bubblewrap: reap it, so that its pidfd has a status
            status = await asyncio.to_thread(exit_status, fd) if fd >= 0 else None
        finally:
            for watched in w.fds:
                os.close(watched)
            w.fds.clear()
        if role == "bwrap":
            reason = f"the sandbox's bubblewrap process exited{describe(status)}"
        elif role == "agent":
            reason = f"the guest agent exited{describe(status)}"
        else:
            reason = "the guest agent was gone when instance_svc started watching it"
        if self._watches.get(w.sandbox_id) is w:
            del self._watches[w.sandbox_id]
            _log.info("sandbox ended by itself", extra={"sandbox_id": w.sandbox_id, "reason": reason})
            try:
                w.on_exit(w.sandbox_id, reason)
            except Exception:
                _log.exception("exit handler failed", extra={"sandbox_id": w.sandbox_id})


__all__ = ["ExitHandler", "Watcher", "describe", "exit_status"]
