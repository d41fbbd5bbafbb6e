"""Reaping of child processes: the agent may be PID 1 of a sandbox and must leave no zombie.

Invariants
----------
* Processes the agent starts itself are registered (`watch(pid, callback)`) synchronously on the
  event loop thread right after they were spawned, and are reaped with `os.waitpid(pid)` for that
  pid only, so their exit status always reaches their owner.
* Every other zombie child (orphaned grandchildren re-parented to the agent, because it is PID 1
  or a child subreaper) is reaped too, but only after it was seen as a zombie on two scans in a
  row. Code elsewhere in the agent (asyncio subprocesses of the desktop helpers) reaps its own
  children at once through asyncio's child watcher; the grace period keeps us from stealing their
  status. Zombies are found in /proc; without /proc, `waitid(WNOWAIT)` peeks at them one by one.
* Reaping runs on SIGCHLD and on a periodic tick (signals coalesce; the tick is the safety net).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable

_log = logging.getLogger("guest_agent.reaper")

_PR_SET_CHILD_SUBREAPER = 36

ExitCallback = Callable[[int], None]  # receives the raw wait status


def become_subreaper() -> bool:
    """Ask Linux to re-parent our orphaned descendants to us (so we can reap them); True on success."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _zombie_children(parent: int) -> set[int] | None:
    """Pids of zombie children of `parent`, or None when /proc is not readable."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    found: set[int] = set()
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name is in parentheses and may itself contain spaces or parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and fields[0] == b"Z" and int(fields[1]) == parent:
            found.add(int(name))
    return found


def _any_zombie_child() -> bool:
    """Whether some child of ours has exited and waits to be reaped (a peek: nothing is reaped)."""
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # no children at all
        return False


class Reaper:
    """Collects the exit status of registered children and reaps every other zombie child."""

    def __init__(self, tick_seconds: float = 1.0) -> None:
        self._watched: dict[int, ExitCallback] = {}
        self._suspects: set[int] = set()
        self._tick_seconds = tick_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Install the SIGCHLD handler and the periodic tick on `loop`."""
        self._loop = loop
        try:
            loop.add_signal_handler(signal.SIGCHLD, self._on_sigchld)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
            _log.warning("no SIGCHLD handler; reaping on the periodic tick only")
        self._schedule()

    def stop(self) -> None:
        """Remove the handler and the tick."""
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_signal_handler(signal.SIGCHLD)
        if self._timer is not None:
            self._timer.cancel()

    def watch(self, pid: int, callback: ExitCallback) -> None:
        """Deliver `pid`'s wait status to `callback` (on the loop) once it exits."""
        self._watched[pid] = callback
        # The child may already have exited before it was registered.
        self._reap_watched()

    def _schedule(self) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_later(self._tick_seconds, self._on_tick)

    def _on_sigchld(self) -> None:
        self._reap_watched()

    def _on_tick(self) -> None:
        try:
            self._reap_watched()
            self._reap_orphans()
        finally:
            self._schedule()

    def _reap_watched(self) -> None:
        for pid in list(self._watched):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                # Someone else reaped it: the status is lost, report an unknown exit.
                done, status = pid, 255 << 8
            if done == pid:
                callback = self._watched.pop(pid)
                try:
                    callback(status)
                except Exception:
                    _log.exception("exit callback failed", extra={"pid": pid})

    def _reap_orphans(self) -> None:
        if not _any_zombie_child():
            # The /proc scan below costs ~2 ms with a hundred processes on a host (it blocks the
            # event loop once per tick, a latency spike for whatever call is in flight); skip it
            # when a peek says that no child is a zombie, which is the usual case.
            self._suspects = set()
            return
        zombies = _zombie_children(os.getpid())
        if zombies is None:
            self._reap_orphans_without_proc()
            return
        for pid in zombies - self._watched.keys():
            if pid in self._suspects:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        self._suspects = zombies - self._watched.keys()

    def _reap_orphans_without_proc(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            if info.si_pid in self._watched:
                self._reap_watched()
                continue
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, os.WNOHANG)
