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
(`nohup server &` keeps working); empty cgroups are removed when their command finishes, or later
by `CommandCgroups.sweep`.

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
_MIB = 1024 * 1024


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _read(path: Path) -> str:
    with open(path) as fh:
        return fh.read()


def _subtree(top: Path) -> list[Path]:
    """`top` and every cgroup below it, deepest first (tenant code may nest its own)."""
    return [Path(d) for d, _, _ in os.walk(top, topdown=False)]


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

    def oom_kills(self) -> int:
        """How many processes of the command the kernel's OOM killer killed (0 without a memory cgroup)."""
        memory = self.dirs.get("memory")
        if memory is None:
            return 0
        total = 0
        for cgroup in _subtree(memory):
            with contextlib.suppress(OSError, ValueError):
                for line in _read(cgroup / "memory.oom_control").splitlines():
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        total += int(value)
        return total

    def remove(self) -> bool:
        """Remove the command's cgroups; False while some process still lives in them."""
        done = True
        for top in self.dirs.values():
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
        self.home = {ctrl: root / "agent" for ctrl, root in roots.items()}
        for home in self.home.values():
            home.mkdir(exist_ok=True)
            _write(home / "cgroup.procs", str(os.getpid()))  # every thread of the agent

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
        """Fresh cgroups for one command (None when they cannot be made: it then runs in the agent's)."""
        self.sweep()
        name = f"cmd-{next(self._counter)}"
        dirs: dict[str, Path] = {}
        try:
            for ctrl, root in self.roots.items():
                path = root / name
                path.mkdir()
                dirs[ctrl] = path
        except OSError as err:
            _log.warning("cannot make a command's cgroup", extra={"error": str(err)})
            CommandCgroup(dirs).remove()
            return None
        return CommandCgroup(dirs)

    @contextlib.contextmanager
    def spawning_into(self, cgroup: CommandCgroup | None) -> Iterator[None]:
        """Run the body (one spawn) with the calling thread inside `cgroup`, so the child is born there.

        "0" written to `tasks` names the writing thread itself (v1), whatever pid namespace we see.
        """
        if cgroup is None:
            yield
            return
        moved: list[str] = []
        try:
            for ctrl, path in cgroup.dirs.items():
                _write(path / "tasks", "0")
                moved.append(ctrl)
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

    def _move_back(self, controllers: list[str]) -> None:
        for ctrl in controllers:
            try:
                _write(self.home[ctrl] / "tasks", "0")
            except OSError as err:
                # Staying in a command's cgroup would put later children there and make us a
                # target of its kill (members() excludes our pid, not our later children).
                _log.error("cannot move back into the agent's cgroup", extra={"error": str(err)})
                raise

    def finished(self, cgroup: CommandCgroup) -> None:
        """The command finished: remove its cgroups now, or once what it left running is gone."""
        if not cgroup.remove():
            self._lingering.append(cgroup)

    def sweep(self) -> None:
        """Remove the cgroups of finished commands whose last process has gone."""
        if self._lingering:
            self._lingering = [cg for cg in self._lingering if not cg.remove()]
