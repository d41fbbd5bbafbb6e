"""The processes the agent runs and their lifecycle: the table (lookup by pid and tag), output,
stdin, signals, timeouts, and how long a finished one is kept.

How a process is started on the OS is in `process_spawn`; how its output reaches several readers
in `_fanout`; who collects exit statuses in `_reaper`.

Everything here runs on the event loop thread; nothing blocks it (pipes are non-blocking and
watched with `add_reader` / `add_writer`), and no state is shared with other threads.

Life of a process
-----------------
1. `ProcessTable.spawn` / `spawn_pty` starts it in a new session (so it leads its own process
   group: signals reach grandchildren too) and, where the runtime delegated cgroups, in a cgroup
   of its own (`process_cgroups`: a timeout or kill then reaches `setsid` and double-forked
   descendants as well), registers its pid with the reaper and starts reading its output, all
   synchronously: a subscriber added right after cannot miss a byte.
2. Output chunks (at most `chunk_bytes` each, raw bytes) go to the replay ring and to every
   subscriber (see `_fanout` for the back-pressure rule).
   A timeout, or the end of the stream of a foreground process, kills: SIGTERM (SIGHUP on a
   terminal) to its groups and to every process of its cgroup, SIGKILL after `kill_grace_seconds`;
   once the leader is gone during a kill, whatever else of the command still runs is frozen and
   SIGKILLed at once, before the exit is reported. A process that ends by itself leaves what it
   started running (`nohup server &` is a way to start a server), and its cgroup stays until they end.
3. The process is *finished* once the reaper delivered the leader's exit status AND its output
   reached end-of-file. Descendants that keep the pipe open (a daemon started with `&`) would
   otherwise hold the stream forever, so once the leader is gone we stop waiting after the pipe
   stayed silent for `drain_seconds` and close our end.
4. A finished process stays in the table `exit_retention_seconds` (at least 60 s by default) so a
   late reattach still sees how it ended, then it is forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from cyberdesk_common.config import env_float, env_int
from cyberdesk_common.status import RpcError, failed_precondition, invalid_argument, not_found, resource_exhausted
from guest_agent._fanout import (
    STDERR,
    STDOUT,
    Chunk,
    Collector,
    Exited,
    Ring,
    Subscriber,
    TerminalPace,
    TerminalPacing,
    pace_terminal,
)
from guest_agent._reaper import Reaper
from guest_agent.process_cgroups import CommandCgroup, CommandCgroups, pids_exhausted_message
from guest_agent.process_spawn import OomScore, Spec, not_started, set_winsize, spawn_on_pipes, spawn_on_terminal


@dataclass(frozen=True)
class Limits:
    """Buffer sizes and delays; each one can be set by an environment variable (tests shorten them)."""

    chunk_bytes: int = 64 * 1024
    ring_bytes: int = 1024 * 1024
    subscriber_bytes: int = 4 * 1024 * 1024
    keepalive_seconds: float = 15.0
    exit_retention_seconds: float = 60.0
    kill_grace_seconds: float = 2.0
    drain_seconds: float = 0.5
    terminal: TerminalPacing = field(default_factory=TerminalPacing)

    @classmethod
    def from_env(cls) -> Limits:
        """Read CYBERDESK_AGENT_RING_BYTES, _SUBSCRIBER_BYTES, _KEEPALIVE_SECONDS, _EXIT_RETENTION_SECONDS,
        _KILL_GRACE_SECONDS, _DRAIN_SECONDS and, for terminals, _PTY_WINDOW_BYTES, _PTY_WAIT_SECONDS,
        _PTY_STALL_SECONDS and _PTY_BEHIND_BYTES."""
        d = cls()
        t = d.terminal
        window = env_int("AGENT_PTY_WINDOW_BYTES", t.window_bytes, minimum=d.chunk_bytes)
        terminal = TerminalPacing(
            window_bytes=window,
            wait_seconds=env_float("AGENT_PTY_WAIT_SECONDS", t.wait_seconds),
            stall_seconds=env_float("AGENT_PTY_STALL_SECONDS", t.stall_seconds),
            behind_bytes=env_int("AGENT_PTY_BEHIND_BYTES", t.behind_bytes, minimum=window),
        )
        return cls(
            terminal=terminal,
            ring_bytes=env_int("AGENT_RING_BYTES", d.ring_bytes, minimum=0),
            subscriber_bytes=env_int("AGENT_SUBSCRIBER_BYTES", d.subscriber_bytes, minimum=d.chunk_bytes),
            keepalive_seconds=env_float("AGENT_KEEPALIVE_SECONDS", d.keepalive_seconds),
            exit_retention_seconds=env_float("AGENT_EXIT_RETENTION_SECONDS", d.exit_retention_seconds),
            kill_grace_seconds=env_float("AGENT_KILL_GRACE_SECONDS", d.kill_grace_seconds),
            drain_seconds=env_float("AGENT_DRAIN_SECONDS", d.drain_seconds),
        )


# How long after a command's exit its cgroups are removed (when nothing it started still runs).
_CGROUP_SWEEP_DELAY = 0.05


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ManagedProcess:
    """One process (or terminal session) started by the agent, with its output and exit."""

    def __init__(
        self, table: ProcessTable, spec: Spec, pid: int, pty: bool, cgroup: CommandCgroup | None = None
    ) -> None:
        self.table = table
        self.spec = spec
        self.pid = pid
        self.pty = pty
        self.cgroup = cgroup  # None: no per-command cgroup here, kills reach its process groups only
        self._killing = False
        self.start_time = time.time()
        self.exited: Exited | None = None
        self.ring = Ring(table.limits.ring_bytes)
        self.subscribers: set[Subscriber] = set()
        self._loop = table.loop
        self._outputs: dict[int, int] = {}  # our read end -> STDOUT / STDERR
        self._paused = False
        self._status: int | None = None
        self._timed_out = False
        self._kill_reason = ""
        self._drain_timer: asyncio.TimerHandle | None = None
        self._timeout_timer: asyncio.TimerHandle | None = None
        self._stdin_fd: int | None = None
        self._held_master: int | None = None  # a terminal's master kept open until its leader exits
        self._pace_timer: asyncio.TimerHandle | None = None  # a terminal's next pacing decision
        # Created only for a process with a stdin pipe: a finished process stays in the table for a
        # minute, and every object it holds lengthens the garbage collector's full passes.
        self._stdin_queue: asyncio.Queue[tuple[bytes | None, asyncio.Future[None]]] | None = None
        self._stdin_task: asyncio.Task[None] | None = None
        self.done = self._loop.create_future()

    # -- wiring, called by the table right after the spawn -------------------------------------

    def _attach(self, outputs: dict[int, int], stdin_fd: int | None) -> None:
        self._outputs = dict(outputs)
        for fd in self._outputs:
            os.set_blocking(fd, False)
            self._loop.add_reader(fd, self._on_readable, fd)
        if stdin_fd is not None:
            os.set_blocking(stdin_fd, False)
            self._stdin_fd = stdin_fd
            self._stdin_queue = asyncio.Queue()
            self._stdin_task = self._loop.create_task(self._stdin_writer())
            if self.spec.stdin:
                self._enqueue(self.spec.stdin)
            if not self.spec.keep_stdin_open and not self.pty:
                self._enqueue(None)
        if self.spec.timeout is not None:
            self._timeout_timer = self._loop.call_later(self.spec.timeout, self._on_timeout)
        self.table.reaper.watch(self.pid, self._on_exit_status)

    # -- output ---------------------------------------------------------------------------------

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, self.table.limits.chunk_bytes)
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno != errno.EIO:  # EIO: a terminal whose last slave end was closed
                raise
            data = b""
        if not data:
            if self.pty and self._status is None:
                self._hold_master(fd)
            else:
                self._close_output(fd)
            return
        if self.pty:
            data = self._read_more(fd, data)
        chunk = Chunk(self._outputs[fd], data)
        self.ring.append(chunk)
        for sub in self.subscribers:
            sub.push(chunk)
        if self._drain_timer is not None:
            self._arm_drain()
        if self.pty:
            self._pace_terminal()
            return
        pacer = next((s for s in self.subscribers if s.above_high_water()), None)
        if pacer is not None:
            self._pause(pacer)

    def _pause(self, pacer: Subscriber) -> None:
        self._paused = True
        for fd in self._outputs:
            self._loop.remove_reader(fd)

        async def resume() -> None:
            await pacer.wait_drained()
            self._paused = False
            for fd in self._outputs:
                self._loop.add_reader(fd, self._on_readable, fd)

        self.table.keep(self._loop.create_task(resume()))

    def _read_more(self, fd: int, data: bytes) -> bytes:
        """`data` and what else the terminal has ready now, up to a chunk, without waiting.

        A pty master gives at most what the line discipline has pushed (a few KiB) per read, so
        `seq` would otherwise travel as ~3 KiB messages, and every message costs the same
        overhead on every hop.
        """
        limit = self.table.limits.chunk_bytes
        if len(data) >= limit:
            return data
        parts = [data]
        size = len(data)
        while size < limit:
            try:
                more = os.read(fd, limit - size)
            except OSError:  # nothing ready now (EAGAIN), or the end, seen by the next read
                break
            if not more:
                break
            parts.append(more)
            size += len(more)
        return b"".join(parts) if len(parts) > 1 else data

    def _pace_terminal(self) -> TerminalPace | None:
        """Apply a terminal's pacing rule now (`_fanout.pace_terminal`): detach, pause, recheck later."""
        if self._pace_timer is not None:
            self._pace_timer.cancel()
            self._pace_timer = None
        if self.exited is not None:
            return None
        pace = pace_terminal(self.subscribers, self.table.limits.terminal, time.monotonic())
        for sub, why in pace.detach:
            self.subscribers.discard(sub)
            sub.detach(resource_exhausted(why))
        if pace.recheck_in is not None:
            self._pace_timer = self._loop.call_later(pace.recheck_in, self._pace_terminal)
        if pace.blocking is not None and not self._paused:
            self._pause_terminal()
        return pace

    def _pause_terminal(self) -> None:
        """Stop reading the master until no reader the terminal waits for is behind by its window.

        The kernel's tty buffer then fills and the program blocks on write: the back-pressure of a
        foreground exec, applied to the slowest reader that is still reading.
        """
        self._paused = True
        for fd in self._outputs:
            self._loop.remove_reader(fd)

        async def resume() -> None:
            while (pace := self._pace_terminal()) is not None and pace.blocking is not None:
                # Woken by that reader's progress, or when time may have changed who is reading.
                with contextlib.suppress(TimeoutError):
                    wait = pace.recheck_in or self.table.limits.terminal.wait_seconds
                    await asyncio.wait_for(pace.blocking.wait_drained(), wait)
            self._paused = False
            for fd in self._outputs:
                self._loop.add_reader(fd, self._on_readable, fd)

        self.table.keep(self._loop.create_task(resume()))

    def _hold_master(self, fd: int) -> None:
        """Every slave end of the terminal is closed, but its leader may not have exited yet.

        `cat` closes 0, 1 and 2 and only then calls exit_group; closing the master in between hangs
        up the session, and the kernel's SIGHUP kills the leader before it exits (exit 0 reported
        as 'killed by SIGHUP', about 1 run in 8 with input typed ahead). So stop reading (nothing
        more can come) and close the master once the leader's status is in.
        """
        self._loop.remove_reader(fd)
        del self._outputs[fd]
        self._stdin_fd = None  # no slave to deliver keystrokes to
        self._held_master = fd

    def _close_output(self, fd: int) -> None:
        if fd == self._stdin_fd:  # a terminal's master is both; never write to a closed (reused) fd
            self._stdin_fd = None
        self._loop.remove_reader(fd)
        os.close(fd)
        del self._outputs[fd]
        self._maybe_finish()

    def _arm_drain(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._drain_timer = self._loop.call_later(self.table.limits.drain_seconds, self._on_drain_timeout)

    def _on_drain_timeout(self) -> None:
        if self._paused:  # a slow consumer, not a silent pipe: keep waiting
            self._arm_drain()
            return
        for fd in list(self._outputs):
            self._close_output(fd)

    # -- exit -----------------------------------------------------------------------------------

    def _on_exit_status(self, status: int) -> None:
        self._status = status
        if self._held_master is not None:
            os.close(self._held_master)
            self._held_master = None
        if self._killing and self.cgroup is not None:
            # Its leader is gone: nothing of the command may outlive the exit we are about to report.
            self.cgroup.kill_all()
        if self._outputs:
            self._arm_drain()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._status is None or self._outputs or self.exited is not None:
            return
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self._timeout_timer is not None:
            self._timeout_timer.cancel()
        if self._pace_timer is not None:
            self._pace_timer.cancel()
        code = os.waitstatus_to_exitcode(self._status)
        error = self._kill_reason
        if self._timed_out:
            if self.cgroup is not None:
                error = f"timed out after {self.spec.timeout:g} s; it and every process it started were killed"
            else:
                error = (
                    f"timed out after {self.spec.timeout:g} s; its process group was killed (no per-command "
                    "cgroup here: processes that left the group, e.g. with setsid, may still run)"
                )
        elif code < 0 and not error:
            error = f"killed by signal {signal.Signals(-code).name}"
        # Exact: the command's own memory cgroup counts the OOM killer's victims among its processes.
        oom = self.cgroup is not None and self.cgroup.oom_kills(nested=code != 0) > 0
        if oom:
            limit = self.table.cgroups.memory_limit_text if self.table.cgroups is not None else ""
            who = "it was killed" if code == -signal.SIGKILL else "a process it started was killed"
            text = f"out of memory: {who} by the kernel because the instance reached its memory limit{limit}"
            error = f"{error}; {text}" if self._timed_out or self._kill_reason else text
        self.exited = Exited(
            exit_code=code if code >= 0 else -1,
            signal=-code if code < 0 else 0,
            timed_out=self._timed_out,
            error=error,
            end_time=time.time(),
            out_of_memory=oom,
        )
        self._close_stdin_now()
        for sub in self.subscribers:
            sub.push(self.exited)
        self.done.set_result(None)
        self.table._finished(self)

    # -- control --------------------------------------------------------------------------------

    def _on_timeout(self) -> None:
        if self.exited is None:
            self._timed_out = True
            self.kill_group()

    def kill_group(self, reason: str = "") -> None:
        """SIGTERM to the process group and its cgroup, SIGKILL after the grace period (all it started)."""
        if self.exited is not None:
            return
        if reason and not self._kill_reason:
            self._kill_reason = reason
        self._killing = True
        first = signal.SIGHUP if self.pty else signal.SIGTERM
        groups = self._groups()
        for pgid in groups:
            _killpg(pgid, first)
            if self.pty:
                _killpg(pgid, signal.SIGCONT)  # a stopped job must run to see its SIGHUP
        cgroup = self.cgroup
        if cgroup is not None:
            cgroup.signal_all(first)  # daemons in sessions of their own get the polite signal too
            cgroup.kills_due += 1  # not recycled for another command before finish_off has run

        def finish_off() -> None:
            for pgid in groups:
                _killpg(pgid, signal.SIGKILL)
            if cgroup is not None:
                try:
                    cgroup.kill_all()
                finally:
                    cgroup.kills_due -= 1
                    if self.table.cgroups is not None:
                        self.table.cgroups.sweep()  # it may be free (or removable) now

        self._loop.call_later(self.table.limits.kill_grace_seconds, finish_off)

    def _groups(self) -> list[int]:
        groups = [self.pid]
        fg = self.foreground_group()
        if fg and fg != self.pid:
            groups.append(fg)
        return groups

    def foreground_group(self) -> int:
        """The foreground process group of a terminal (its job in front), else the leader's group."""
        if self.pty:
            for fd in self._outputs:
                with contextlib.suppress(OSError):
                    return os.tcgetpgrp(fd)
        return self.pid

    def send_signal(self, sig: int, *, foreground: bool = False) -> None:
        """Send `sig` to the whole process group (or a terminal's foreground group).

        SIGKILL to a whole process is its kill: everything it started goes too (its cgroup), as
        at a timeout. Other signals are messages to the group and reach only the group.
        """
        if self.exited is not None:
            raise failed_precondition(f"process {self.pid} has already exited")
        _killpg(self.foreground_group() if foreground else self.pid, sig)
        if sig == signal.SIGKILL and not foreground and self.cgroup is not None:
            self._killing = True
            self.cgroup.kill_all()

    def resize(self, cols: int, rows: int) -> None:
        """Set a terminal's window size; the kernel tells the foreground job with SIGWINCH."""
        if not self.pty:
            raise failed_precondition(f"process {self.pid} has no terminal to resize")
        for fd in self._outputs:
            with contextlib.suppress(OSError):
                set_winsize(fd, cols, rows)

    # -- stdin ----------------------------------------------------------------------------------

    @property
    def stdin_open(self) -> bool:
        """Whether input can still be written."""
        return self._stdin_fd is not None and self.exited is None

    def _enqueue(self, data: bytes | None) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self._loop.create_future()
        if self._stdin_queue is None:  # no stdin pipe, or the process finished
            future.set_exception(failed_precondition(self._stdin_closed_message()))
        else:
            self._stdin_queue.put_nowait((data, future))
        return future

    async def write(self, data: bytes) -> None:
        """Write `data` to stdin after every earlier write (order is kept); waits until written."""
        if not self.stdin_open:
            raise failed_precondition(self._stdin_closed_message())
        await self._enqueue(data)

    async def close_stdin(self) -> None:
        """Close stdin after the pending writes, so the process reads end-of-file."""
        if self.pty:
            raise failed_precondition(f"process {self.pid} runs on a terminal: send Ctrl-D (\\x04) as input instead")
        if not self.stdin_open:
            raise failed_precondition(self._stdin_closed_message())
        await self._enqueue(None)

    def _stdin_closed_message(self) -> str:
        if self.exited is not None:
            return f"process {self.pid} has exited; its stdin is closed"
        return f"the stdin of process {self.pid} is closed (start it with keep_stdin_open to send input later)"

    async def _stdin_writer(self) -> None:
        queue = self._stdin_queue
        assert queue is not None  # started by _attach right after creating it
        while True:
            data, future = await queue.get()
            fd = self._stdin_fd
            try:
                if fd is None:
                    raise failed_precondition(self._stdin_closed_message())
                if data is None:
                    if not self.pty:
                        self._stdin_fd = None
                        os.close(fd)
                else:
                    await self._write_all(fd, data)
            except RpcError as err:
                future.set_exception(err)
            except OSError as err:
                self._close_stdin_now()
                future.set_exception(failed_precondition(f"process {self.pid} closed its stdin ({err.strerror})"))
            else:
                future.set_result(None)

    async def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                ready: asyncio.Future[None] = self._loop.create_future()
                self._loop.add_writer(fd, _set_once, ready)
                try:
                    await ready
                finally:
                    self._loop.remove_writer(fd)
                continue
            view = view[written:]

    def _close_stdin_now(self) -> None:
        if self._stdin_fd is not None and not self.pty:
            with contextlib.suppress(OSError):
                os.close(self._stdin_fd)
        self._stdin_fd = None
        if self._stdin_task is not None and self.exited is not None:
            self._stdin_task.cancel()
            queue, self._stdin_queue = self._stdin_queue, None
            while queue is not None and not queue.empty():
                _, future = queue.get_nowait()
                if not future.done():
                    future.set_exception(failed_precondition(self._stdin_closed_message()))

    # -- subscriptions --------------------------------------------------------------------------

    def subscribe(self, *, replay: bool, pacer: bool = False) -> Subscriber:
        """A new consumer of the output; with `replay`, it starts with the buffered output."""
        if self.pty:  # every reader of a terminal paces it (see `_pace_terminal`)
            sub = Subscriber(self.table.limits.terminal.window_bytes, pacer=True)
        else:
            sub = Subscriber(self.table.limits.subscriber_bytes, pacer=pacer)
        if replay:
            for chunk in self.ring.snapshot():
                sub.push(chunk)
        if self.exited is not None:
            sub.push(self.exited)
        else:
            self.subscribers.add(sub)
        return sub

    def collect(self, max_bytes: int) -> Collector:
        """A consumer that keeps all the output from now on (up to `max_bytes`) and the exit."""
        sub = Collector(max_bytes)
        if self.exited is not None:
            sub.push(self.exited)
        else:
            self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """The consumer left (a paused reader waiting on it resumes)."""
        sub.close()
        self.subscribers.discard(sub)


class ProcessTable:
    """Every process the agent started, by pid and by tag (running ones, then recent exits)."""

    def __init__(self, limits: Limits, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.limits = limits
        self.loop = loop or asyncio.get_running_loop()
        self.reaper = Reaper()
        self.reaper.start(self.loop)
        # None where the runtime delegated no cgroups (the agent run bare): kills by process group.
        self.cgroups = CommandCgroups.from_env()
        self._oom_score = OomScore()
        self._by_pid: dict[int, ManagedProcess] = {}
        self._running_tags: dict[str, ManagedProcess] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Finished processes in the order they finished, with the loop time to forget them at; one
        # timer sweeps them (a timer per process would be ~6 more objects each to keep alive).
        self._retired: deque[tuple[float, ManagedProcess]] = deque()
        self._sweep_timer: asyncio.TimerHandle | None = None

    def keep(self, task: asyncio.Task[None]) -> None:
        """Hold a reference to a fire-and-forget task until it ends."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def all(self) -> list[ManagedProcess]:
        """Known processes, oldest first."""
        return sorted(self._by_pid.values(), key=lambda p: p.start_time)

    def find(self, pid: int, tag: str) -> ManagedProcess:
        """The process with `pid`, or the running (else most recent) one with `tag`."""
        if pid:
            proc = self._by_pid.get(pid)
            if proc is None:
                raise not_found(f"no process with pid {pid} (it never ran here or exited over a minute ago)")
            return proc
        if tag:
            proc = self._running_tags.get(tag)
            if proc is None:
                tagged = [p for p in self._by_pid.values() if p.spec.tag == tag]
                if not tagged:
                    raise not_found(f"no process tagged {tag!r}")
                proc = max(tagged, key=lambda p: p.start_time)
            return proc
        raise invalid_argument("selector: give a pid or a tag")

    def _check_tag(self, tag: str) -> None:
        if tag and tag in self._running_tags:
            other = self._running_tags[tag]
            raise RpcError(
                grpc.StatusCode.ALREADY_EXISTS, f"tag {tag!r} is already used by running process {other.pid}"
            )

    def _register(self, proc: ManagedProcess) -> None:
        self._by_pid[proc.pid] = proc
        if proc.spec.tag:
            self._running_tags[proc.spec.tag] = proc

    def _finished(self, proc: ManagedProcess) -> None:
        if self._running_tags.get(proc.spec.tag) is proc:
            del self._running_tags[proc.spec.tag]
        if proc.cgroup is not None and self.cgroups is not None:
            self.cgroups.finished(proc.cgroup)
            # After the reply that this exit completes has gone out, not before it.
            self.loop.call_later(_CGROUP_SWEEP_DELAY, self.cgroups.sweep)

        self._retired.append((self.loop.time() + self.limits.exit_retention_seconds, proc))
        if self._sweep_timer is None:
            self._sweep_timer = self.loop.call_at(self._retired[0][0], self._sweep)

    def _sweep(self) -> None:
        """Forget the finished processes whose retention ran out; wake again for the next one."""
        self._sweep_timer = None
        now = self.loop.time()
        while self._retired and self._retired[0][0] <= now:
            _, proc = self._retired.popleft()
            if self._by_pid.get(proc.pid) is proc:
                del self._by_pid[proc.pid]
        if self._retired:
            self._sweep_timer = self.loop.call_at(self._retired[0][0], self._sweep)

    def spawn(self, spec: Spec) -> ManagedProcess | Exited:
        """Start a process on pipes; a program that cannot be started gives an `Exited` (127/126)."""
        self._check_tag(spec.tag)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if (spec.stdin or spec.keep_stdin_open) else (None, None)
        cgroup = self.cgroups.new() if self.cgroups is not None else None
        try:
            with self._spawning_into(cgroup):
                pid = spawn_on_pipes(spec, in_r, out_w, err_w)
        except OSError as err:
            for fd in (out_r, err_r, in_w):
                if fd is not None:
                    os.close(fd)
            if cgroup is not None:
                cgroup.remove()
            if err.errno == errno.EAGAIN:  # fork/clone: the instance's pids limit is reached
                raise resource_exhausted(pids_exhausted_message("start a process")) from None
            return not_started(spec.argv[0], err)
        finally:
            for fd in (out_w, err_w, in_r):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        proc = ManagedProcess(self, spec, pid, pty=False, cgroup=cgroup if cgroup and cgroup.dirs else None)
        if self.cgroups is not None:
            self.loop.call_soon(self.cgroups.prepare_spare)  # runs while the child execs
        self._register(proc)
        proc._attach({out_r: STDOUT, err_r: STDERR}, in_w)
        return proc

    def spawn_pty(self, spec: Spec) -> ManagedProcess:
        """Start a terminal session: the program gets a new pty as its controlling terminal."""
        self._check_tag(spec.tag)
        master, slave = os.openpty()
        cols, rows = spec.pty_size or (80, 24)
        set_winsize(master, cols, rows)
        cgroup = self.cgroups.new() if self.cgroups is not None else None
        try:
            with self._spawning_into(cgroup):
                pid = spawn_on_terminal(spec, slave)
        except OSError as err:
            os.close(master)
            if cgroup is not None:
                cgroup.remove()
            if err.errno == errno.EAGAIN:
                raise resource_exhausted(pids_exhausted_message("start a terminal")) from None
            raise
        finally:
            os.close(slave)
        proc = ManagedProcess(self, spec, pid, pty=True, cgroup=cgroup if cgroup and cgroup.dirs else None)
        if self.cgroups is not None:
            self.loop.call_soon(self.cgroups.prepare_spare)
        self._register(proc)
        proc._attach({master: STDOUT}, master)
        return proc

    @contextlib.contextmanager
    def _spawning_into(self, cgroup: CommandCgroup | None) -> Iterator[None]:
        """The child of the spawn in the body is born in `cgroup` and at OOM score 0."""
        with self._oom_score.for_child():
            if self.cgroups is None:
                yield
            else:
                with self.cgroups.spawning_into(cgroup):
                    yield

    async def close(self) -> None:
        """Stop reaping (at shutdown)."""
        self.reaper.stop()
