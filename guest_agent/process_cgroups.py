"""One cgroup per command, so that a timeout or a kill ends everything the command started.

A process group is not enough: `setsid`, `nohup ... &` and double-forked daemons leave their
command's group (and, re-parented to the agent as PID 1, its process tree), and would outlive a
timeout. A cgroup cannot be left that way: every descendant is born in its parent's cgroup.

Where: the runtime delegates the instance's own cgroups to the sandbox uid and binds them at
`CYBERDESK_AGENT_CGROUP_DIR/<controller>` (the local runtime: /run/cgroup/{pids,freezer,memory},
cgroup v1; see instance_svc/runtime/local/cgroups.py). At start the agent moves itself into a
child `agent/`; each command gets `cmd-<n>/` in every controller.

How a command gets in before it runs: the spawning thread (the event loop's) moves itself into the
command's cgroups (v1 moves single threads through `tasks`), spawns (posix_spawn or fork: the child
is born there, so not one instruction of it runs outside), and moves back into `agent/`. The whole
window is synchronous on the loop thread, so no other child and no thread is created meanwhile.
Measured: a migration costs ~0.04 ms and a cgroup's mkdir+rmdir 0.05 (pids, freezer) to 0.12 ms
(memory) on the 2-core development machine.

What each controller is for:

* pids: who belongs to the command (`cgroup.procs` of its subtree);
* freezer: a fork bomb cannot outrun the kill: freeze, SIGKILL every member, thaw;
* memory: the command's own `oom_kill` counter (memory.oom_control) says exactly that the kernel's
  OOM killer, acting on the instance's limit (the parent's), killed a process of this command.

A command that exits by itself leaves its cgroup in place while anything it started still runs
(`nohup server &` keeps working); `CommandCgroups.sweep` recycles the empty ones for later
commands (up to 16; the rest are removed). The table calls it shortly after a command finished,
and readies the next command's cgroups right after a spawn, so that no mkdir or rmdir sits
between a request and its reply. A cgroup keeps its `tasks` files and its memory.oom_control
open while it is in use or kept for reuse (4 descriptors each, at most 16 idle; a sweep that
finds a process of it still running closes them), so readying a reused cgroup and reading a
command's OOM count at its exit open nothing. Measured in-process (300 `true` in a row, load
average ~10 on the 2-core machine, p50): readying the spare 0.26-0.28 ms -> 0.04-0.05, the
exit's OOM read 0.10-0.12 -> 0.03; the sweep (0.25-0.30 ms, 50 ms after the exit) and the six
`tasks` writes of a spawn (0.08) are unchanged.

Limits of the scheme: tenant code runs as the agent's uid, so it can deliberately move its own
processes into another cgroup of the instance and so survive its command's timeout; it can never
leave the instance's cgroup or its limits. Without a delegated hierarchy (the agent run bare, cgroup
v2 for now) `CommandCgroups.from_env` is None and commands are killed by process group, as before.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

_log = logging.getLogger("guest_agent.process_cgroups")

CONTROLLERS = ("pids", "freezer", "memory")
_FREEZE_WAIT_SECONDS = 0.5
_FREE_MAX = 16  # empty cgroups kept for reuse
_MIB = 1024 * 1024


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _read(path: Path) -> str:
    with open(path) as fh:
        return fh.read()


def _subtree(top: Path) -> list[Path]:
    """`top` and every cgroup below it, deepest first (tenant code may nest its own).

    One scandir per cgroup (os.walk cost ~0.1 ms more per command, measured).
    """
    found: list[Path] = []
    try:
        children = [Path(e.path) for e in os.scandir(top) if e.is_dir(follow_symlinks=False)]
    except OSError:
        children = []
    for child in children:
        found.extend(_subtree(child))
    found.append(top)
    return found


def limit_text(root: str | None = None) -> str:
    """The instance's process limit, for messages: "its limit of 1024 processes (pids.max)" where known."""
    base = Path(root or os.environ.get("CYBERDESK_AGENT_CGROUP_DIR", "") or "/nonexistent")
    with contextlib.suppress(OSError, ValueError):
        value = _read(base / "pids" / "pids.max").strip()
        if value != "max":
            return f"its limit of {int(value)} processes (pids.max)"
    return "its process limit"


def pids_exhausted_message(what: str) -> str:
    """Why `what` ("start a process", "start a thread") failed when fork/clone said EAGAIN."""
    return f"cannot {what}: the instance has reached {limit_text()}; end some of its processes and retry"


class CommandCgroup:
    """The cgroups of one command (one dir per controller)."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs
        # Write ends of each controller's `tasks`, opened ahead (`open_tasks`) so that the spawn
        # itself opens nothing; kept open while the cgroup exists, for the commands that reuse it.
        self.tasks_fds: list[int] = []
        # memory.oom_control, kept open too: read with pread at every exit (kernfs re-renders it).
        self._oom_fd = -1
        # OOM kills counted before this command (a recycled cgroup keeps its counter).
        self.oom_base = 0
        # Kill passes still due against this command (a kill's SIGKILL comes kill_grace_seconds
        # after its SIGTERM). While one is due the cgroup is neither recycled nor removed: the
        # command may be gone already, and a later command in the same cgroup would be killed.
        self.kills_due = 0

    def open_tasks(self) -> None:
        """Open the `tasks` files the spawn will write to and memory.oom_control, unless open.

        Raises OSError; then none stays open.
        """
        if self.tasks_fds:
            return
        try:
            for path in self.dirs.values():
                self.tasks_fds.append(os.open(path / "tasks", os.O_WRONLY | os.O_CLOEXEC))
            memory = self.dirs.get("memory")
            if memory is not None:
                self._oom_fd = os.open(memory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.close_tasks()
            raise

    def close_tasks(self) -> None:
        """Close what `open_tasks` opened, and the kept memory.oom_control."""
        fds, self.tasks_fds = self.tasks_fds, []
        if self._oom_fd >= 0:
            fds.append(self._oom_fd)
            self._oom_fd = -1
        for fd in fds:
            os.close(fd)

    def members(self) -> set[int]:
        """Pids of every live process of the command (its subtree), the agent itself never included."""
        found: set[int] = set()
        for top in self.dirs.values():
            for cgroup in _subtree(top):
                with contextlib.suppress(OSError, ValueError):
                    found.update(int(p) for p in _read(cgroup / "cgroup.procs").split())
        found.discard(os.getpid())  # in the window of a spawn the agent's loop thread is a member
        return found

    def signal_all(self, sig: int) -> None:
        """Send `sig` to every process of the command."""
        for pid in self.members():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def kill_all(self) -> None:
        """SIGKILL every process of the command: frozen first, so none can fork while it is killed."""
        freezer = self.dirs.get("freezer")
        frozen = False
        if freezer is not None:
            try:
                _write(freezer / "freezer.state", "FROZEN")
                deadline = time.monotonic() + _FREEZE_WAIT_SECONDS
                # FREEZING is transient; a task in an uninterruptible sleep can hold it there, and
                # the kill below then still catches every pid already born (the loop catches the rest).
                while _read(freezer / "freezer.state").strip() != "FROZEN" and time.monotonic() < deadline:
                    time.sleep(0.001)
                frozen = True
            except OSError as err:
                _log.warning("cannot freeze a command's cgroup", extra={"error": str(err)})
        try:
            for _ in range(100):
                pids = self.members()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                if frozen:
                    break  # nothing can fork while frozen: one pass got them all
        finally:
            if frozen:
                for cgroup in _subtree(freezer) if freezer is not None else []:
                    with contextlib.suppress(OSError):
                        _write(cgroup / "freezer.state", "THAWED")

    def oom_kills(self, nested: bool = True) -> int:
        """How many processes of the command the kernel's OOM killer killed (0 without a memory cgroup).

        v1 counts a victim only in its own cgroup, so child cgroups (made by tenant code) are read
        too unless `nested` is False (the caller knows nothing failed: saves a scan per command).
        """
        memory = self.dirs.get("memory")
        if memory is None:
            return 0
        total = 0
        for cgroup in _subtree(memory) if nested else [memory]:
            with contextlib.suppress(OSError, ValueError):
                for line in self._oom_control(cgroup).splitlines():
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        total += int(value)
        return total - self.oom_base

    def _oom_control(self, cgroup: Path) -> str:
        if cgroup != self.dirs.get("memory"):  # a child cgroup of the tenant's: read once
            return _read(cgroup / "memory.oom_control")
        if self._oom_fd < 0:
            self._oom_fd = os.open(cgroup / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(self._oom_fd, 4096, 0).decode()

    def reusable(self) -> bool:
        """Empty, with no child cgroup, thawed and no kill due: fit to be the next command's (off the hot path)."""
        if self.kills_due:
            return False
        try:
            if "pids" in self.dirs and _read(self.dirs["pids"] / "pids.current").strip() != "0":
                return False
            if any(_subtree(top) != [top] for top in self.dirs.values()):
                return False
            freezer = self.dirs.get("freezer")
            return freezer is None or _read(freezer / "freezer.state").strip() == "THAWED"
        except OSError:
            return False

    def remove(self) -> bool:
        """Remove the command's cgroups; False while some process still lives in them."""
        self.close_tasks()
        done = True
        for top in self.dirs.values():
            try:
                os.rmdir(top)  # the usual case, without a scan: no child cgroup, no process left
                continue
            except FileNotFoundError:
                continue
            except OSError:
                pass
            for cgroup in _subtree(top):
                try:
                    os.rmdir(cgroup)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    if err.errno != errno.EBUSY:
                        _log.warning("cannot remove a command's cgroup", extra={"error": str(err)})
                    done = False
        return done


class CommandCgroups:
    """The delegated hierarchy: makes a command's cgroups and spawns into them."""

    def __init__(self, roots: dict[str, Path]) -> None:
        self.roots = roots
        self._counter = itertools.count(1)
        self._lingering: list[CommandCgroup] = []
        self._spare: CommandCgroup | None = None
        # Finished commands' empty cgroups, ready for the next ones: reusing one costs no mkdir or
        # rmdir (and no memory cgroup created and destroyed in the kernel, ~0.5 ms a command measured).
        self._free: list[CommandCgroup] = []
        self.home = {ctrl: root / "agent" for ctrl, root in roots.items()}
        for home in self.home.values():
            home.mkdir(exist_ok=True)
            _write(home / "cgroup.procs", str(os.getpid()))  # every thread of the agent
        # Kept open: every spawn writes "0" here to move its thread back (a write needs no open).
        self._home_fds = [os.open(home / "tasks", os.O_WRONLY | os.O_CLOEXEC) for home in self.home.values()]

    @classmethod
    def from_env(cls) -> CommandCgroups | None:
        """The hierarchy named by CYBERDESK_AGENT_CGROUP_DIR when it is there and ours; None otherwise."""
        base = os.environ.get("CYBERDESK_AGENT_CGROUP_DIR", "")
        if not base:
            return None
        roots = {c: Path(base, c) for c in CONTROLLERS if os.access(Path(base, c), os.W_OK)}
        if "pids" not in roots:
            return None
        try:
            return cls(roots)
        except OSError as err:
            _log.warning("per-command cgroups unavailable", extra={"error": str(err)})
            return None

    @property
    def memory_limit_text(self) -> str:
        """The limit for messages, " of 512 MiB", when it can be read; else an empty string."""
        memory = self.roots.get("memory")
        if memory is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            value = int(_read(memory / "memory.limit_in_bytes"))
            if value < 1 << 60:  # "no limit" reads as a huge page-rounded number
                return f" of {value // _MIB} MiB"
        return ""

    def new(self) -> CommandCgroup | None:
        """Fresh cgroups for one command (None when they cannot be made: it then runs in the agent's).

        The spare made by `prepare_spare` after the previous spawn is taken when there is one, so
        the mkdirs (~0.14 ms for three) are not on the path of a command's start.
        """
        spare, self._spare = self._spare, None
        return spare if spare is not None else self._make()

    def prepare_spare(self) -> None:
        """Make the next command's cgroups ahead (called after a spawn, while the child starts)."""
        while self._spare is None and self._free:
            cgroup = self._free.pop()
            try:
                cgroup.open_tasks()
            except OSError:
                cgroup.remove()
                continue
            cgroup.oom_base = 0
            cgroup.oom_base = cgroup.oom_kills(nested=False)
            self._spare = cgroup
        if self._spare is None:
            self._spare = self._make()

    def _make(self) -> CommandCgroup | None:
        for _ in range(100):  # a name left by an earlier agent is skipped, not reused
            name = f"cmd-{next(self._counter)}"
            cgroup = CommandCgroup({})
            try:
                for ctrl, root in self.roots.items():
                    path = root / name
                    path.mkdir()
                    cgroup.dirs[ctrl] = path
                cgroup.open_tasks()
                return cgroup
            except FileExistsError:
                cgroup.remove()
            except OSError as err:
                _log.warning("cannot make a command's cgroup", extra={"error": str(err)})
                cgroup.remove()
                return None
        return None

    @contextlib.contextmanager
    def spawning_into(self, cgroup: CommandCgroup | None) -> Iterator[None]:
        """Run the body (one spawn) with the calling thread inside `cgroup`, so the child is born there.

        "0" written to `tasks` names the writing thread itself (v1), whatever pid namespace we see.
        """
        if cgroup is None:
            yield
            return
        moved = 0
        try:
            for fd in cgroup.tasks_fds:
                os.write(fd, b"0")
                moved += 1
            if moved != len(cgroup.dirs):
                raise OSError(errno.EBADF, "the command's cgroup files are not open")
        except OSError as err:
            # The command then runs without a cgroup (empty `dirs`), killed by process group.
            _log.warning("cannot spawn into a command's cgroup", extra={"error": str(err)})
            self._move_back(moved)
            cgroup.remove()
            cgroup.dirs = {}
            yield
            return
        try:
            yield
        finally:
            self._move_back(moved)

    def _move_back(self, moved: int) -> None:
        # The same controllers in the same order as the command's (both follow `roots`).
        for fd in self._home_fds[:moved]:
            try:
                os.write(fd, b"0")
            except OSError as err:
                # Staying in a command's cgroup would put later children there and make us a
                # target of its kill (members() excludes our pid, not our later children).
                _log.error("cannot move back into the agent's cgroup", extra={"error": str(err)})
                raise

    def finished(self, cgroup: CommandCgroup) -> None:
        """The command finished: its cgroups go at the next `sweep`, or once what it left running is gone."""
        self._lingering.append(cgroup)

    def sweep(self) -> None:
        """Recycle (or remove) the cgroups of finished commands whose last process has gone."""
        if not self._lingering:
            return
        left: list[CommandCgroup] = []
        for cgroup in self._lingering:
            if cgroup.kills_due:
                left.append(cgroup)  # a kill pass of its command is still due: the next sweep decides
            elif len(self._free) < _FREE_MAX and cgroup.reusable():
                self._free.append(cgroup)
            elif not cgroup.remove():  # closes its descriptors: none held while a server it started runs
                left.append(cgroup)
        self._lingering = left
