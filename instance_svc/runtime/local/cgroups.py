"""Cgroups for local sandboxes: memory, CPU and pids limits, the freezer, and killing a whole sandbox.

Both hierarchies are handled:

* v1 (one mount per controller under /sys/fs/cgroup/<controller>): a sandbox gets
  `<controller>/<our own cgroup>/cyberdesk/<sandbox_id>` in each of memory, cpu, pids and freezer.
* v2 (unified, /sys/fs/cgroup/cgroup.controllers exists): one cgroup with memory.max, cpu.max,
  pids.max and cgroup.freeze.

Sandbox cgroups are nested under the cgroup instance_svc itself runs in, so that whatever limits
the operator put on the platform also bound its sandboxes. (v2 forbids processes in a cgroup
whose controllers are delegated to children, so there we fall back to the root when our own
cgroup holds processes.)

The launcher writes the sandbox's first process into `procs_files` before it execs bubblewrap, so
every process of the sandbox is born inside the cgroups: no window in which a fork escapes.

Delegation (v1): the sandbox's pids, freezer and memory dirs are handed to the sandbox uid
(`delegate`: the directory only, chown), and bound into the sandbox at /run/cgroup/<controller>.
Owning the directory lets the agent create child cgroups there, one per command
(guest_agent/process_cgroups.py), whose files it then owns; the sandbox's own limit files
(pids.max, memory.limit_in_bytes, freezer.state) stay root's, and every child is bounded by its
parent's limits, so delegation gives the sandbox bookkeeping, never more resources. A process can
only be moved into a cgroup whose cgroup.procs the mover may write, so nothing inside can move
itself back into the sandbox's top cgroup or out of the sandbox. Because of those child cgroups,
every walk here (the pids of a sandbox, killing, removal) covers the whole subtree.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

_log = logging.getLogger("instance_svc.runtime.cgroups")

CGROUP_ROOT = Path("/sys/fs/cgroup")
_V1_CONTROLLERS = ("memory", "cpu", "pids", "freezer")
# What the agent needs per command: pids (who belongs to it), freezer (stop a fork bomb before the
# kill), memory (the command's own oom_kill counter, to say that the kernel's OOM killer struck).
DELEGATED_CONTROLLERS = ("pids", "freezer", "memory")
_CFS_PERIOD_US = 100_000


def _own_path(controller: str | None) -> str:
    """Our cgroup path in `controller`'s hierarchy (None: the v2 unified hierarchy)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return "/"
    for line in lines:
        _, names, path = line.split(":", 2)
        if controller is None and names == "":
            return path
        if controller is not None and controller in names.split(","):
            return path
    return "/"


@dataclass
class SandboxCgroups:
    """The cgroups of one sandbox.

    `paths` maps a controller ("memory", "cpu", "pids", "freezer", or "unified" for v2) to its dir.
    """

    version: int
    paths: dict[str, str] = field(default_factory=dict)
    enforced: dict[str, bool] = field(default_factory=dict)  # limit name -> really written

    def _rmdir(self, cgroup: Path, deadline: float) -> None:
        while True:
            try:
                os.rmdir(cgroup)
                return
            except FileNotFoundError:
                return
            except OSError as err:
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    _log.warning("cannot remove cgroup", extra={"path": str(cgroup), "error": str(err)})
                    return
                self.kill_all()
                time.sleep(0.01)

    @property
    def procs_files(self) -> list[str]:
        """Files to write the sandbox's first pid into (one per hierarchy)."""
        return [str(Path(p) / "cgroup.procs") for p in self.paths.values()]

    @property
    def can_freeze(self) -> bool:
        """Whether a freezer is available for this sandbox."""
        return "freezer" in self.paths or (self.version == 2 and "unified" in self.paths)

    def delegate(self, uid: int, gid: int) -> list[tuple[str, str]]:
        """Give the sandbox uid its cgroup dirs (v1: pids, freezer, memory); the (controller, dir) pairs to bind.

        Only v1 is delegated: the agent puts a command into its cgroup by moving its own thread
        there for the spawn, which v2 forbids outside threaded cgroups (it would need clone3's
        CLONE_INTO_CGROUP). Whatever cannot be delegated is left out; the agent then falls back to
        killing process groups.
        """
        if self.version != 1:
            return []
        binds: list[tuple[str, str]] = []
        for ctrl in DELEGATED_CONTROLLERS:
            path = self.paths.get(ctrl)
            if path is None:
                continue
            try:
                os.chown(path, uid, gid)
            except OSError as err:
                _log.info("cgroup not delegated", extra={"controller": ctrl, "error": str(err)})
                continue
            binds.append((ctrl, path))
        return binds

    @staticmethod
    def _subtree(top: str) -> list[Path]:
        """`top` and every cgroup below it, deepest first (the order rmdir needs)."""
        return [Path(d) for d, _, _ in os.walk(top, topdown=False)]

    def pids(self) -> list[int]:
        """Every process in the sandbox's cgroups (child cgroups of its commands included)."""
        found: set[int] = set()
        for path in self.paths.values():
            for cgroup in self._subtree(path):
                with contextlib.suppress(OSError):
                    for line in (cgroup / "cgroup.procs").read_text().split():
                        found.add(int(line))
        return sorted(found)

    def freeze(self, timeout: float = 5.0) -> None:
        """Freeze every process; returns once the kernel says the cgroup is frozen."""
        self._set_frozen(True, timeout)

    def thaw(self, timeout: float = 5.0) -> None:
        """Thaw a frozen cgroup."""
        self._set_frozen(False, timeout)

    def frozen(self) -> bool:
        """Whether the sandbox is frozen now."""
        try:
            if self.version == 1 and "freezer" in self.paths:
                return (Path(self.paths["freezer"]) / "freezer.state").read_text().strip() == "FROZEN"
            if self.version == 2 and "unified" in self.paths:
                return "frozen 1" in (Path(self.paths["unified"]) / "cgroup.events").read_text()
        except OSError:
            pass
        return False

    def _set_frozen(self, frozen: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self.version == 1:
            state = Path(self.paths["freezer"]) / "freezer.state"
            want = "FROZEN" if frozen else "THAWED"
            state.write_text(want)
            # FREEZING is transient: the kernel is still stopping tasks.
            while state.read_text().strip() != want:
                if time.monotonic() > deadline:
                    raise OSError(errno.ETIMEDOUT, f"freezer did not reach {want}")
                time.sleep(0.005)
            return
        base = Path(self.paths["unified"])
        (base / "cgroup.freeze").write_text("1" if frozen else "0")
        want_line = f"frozen {1 if frozen else 0}"
        while want_line not in (base / "cgroup.events").read_text():
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, "cgroup.freeze did not take effect")
            time.sleep(0.005)

    def kill_all(self) -> None:
        """SIGKILL every process of the sandbox (thawing first: a frozen task cannot die)."""
        if self.version == 2 and "unified" in self.paths:
            kill_file = Path(self.paths["unified"]) / "cgroup.kill"
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.frozen():
            with contextlib.suppress(OSError):
                self.thaw()
        # A command's cgroup the agent froze for its kill stays frozen when the top is thawed.
        if self.version == 1 and "freezer" in self.paths:
            for cgroup in self._subtree(self.paths["freezer"])[:-1]:
                with contextlib.suppress(OSError):
                    if (cgroup / "freezer.state").read_text().strip() != "THAWED":
                        (cgroup / "freezer.state").write_text("THAWED")

    def remove(self, timeout: float = 5.0) -> None:
        """Remove the cgroup dirs (waits for the killed processes to leave them)."""
        deadline = time.monotonic() + timeout
        for path in self.paths.values():
            for cgroup in self._subtree(path):
                self._rmdir(cgroup, deadline)
            # The shared "cyberdesk" parent goes when its last sandbox does.
            with contextlib.suppress(OSError):
                os.rmdir(Path(path).parent)


class CgroupManager:
    """Creates sandbox cgroups where the host lets us, and says which limits it could set.

    `group` is the directory the sandboxes' cgroups go in; a LocalRuntime names it after its base
    (`cyberdesk-<tag>`), so that the start-up sweep of one instance_svc removes only its own
    sandboxes' cgroups, never those of another instance_svc on the same host.
    """

    def __init__(self, root: Path = CGROUP_ROOT, group: str = "cyberdesk") -> None:
        self._root = root
        self._group = group
        self.version = 2 if (root / "cgroup.controllers").exists() else 1

    def _parents(self) -> list[tuple[str, Path]]:
        """(controller, dir) where this manager puts sandbox cgroups, whether or not the dir exists yet."""
        if self.version == 1:
            return [(c, p) for c in _V1_CONTROLLERS if (p := self._v1_parent(c)) is not None]
        own = self._root / _own_path(None).lstrip("/")
        return [("unified", own / self._group), ("unified", self._root / self._group)]

    def find(self, sandbox_id: str) -> SandboxCgroups:
        """The cgroups of `sandbox_id` that exist now, found by name (also when no state file recorded them)."""
        cg = SandboxCgroups(version=self.version)
        for ctrl, parent in self._parents():
            if (parent / sandbox_id).is_dir() and ctrl not in cg.paths:
                cg.paths[ctrl] = str(parent / sandbox_id)
        return cg

    def existing(self) -> set[str]:
        """The sandbox ids that have a cgroup under this manager's group now (in any hierarchy)."""
        found: set[str] = set()
        for _, parent in self._parents():
            with contextlib.suppress(OSError):
                found.update(e.name for e in os.scandir(parent) if e.is_dir(follow_symlinks=False))
        return found

    def _v1_parent(self, controller: str) -> Path | None:
        mount = self._root / controller
        if not (mount / "cgroup.procs").exists():
            return None
        return mount / _own_path(controller).lstrip("/") / self._group

    def _v2_parent(self) -> Path | None:
        own = self._root / _own_path(None).lstrip("/")
        for base in (own, self._root):
            try:
                wanted = set((base / "cgroup.controllers").read_text().split()) & {"memory", "cpu", "pids"}
                for ctrl in wanted:
                    (base / "cgroup.subtree_control").write_text(f"+{ctrl}")
                parent = base / self._group
                parent.mkdir(exist_ok=True)
                (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))
                return parent
            except OSError:
                continue  # processes in `own` (no-internal-process rule) or no permission: try the root
        return None

    def create(self, sandbox_id: str, memory_bytes: int, vcpus: int, pids_max: int) -> SandboxCgroups:
        """Make the sandbox's cgroups and write its limits; whatever fails is left out (see `enforced`)."""
        cg = SandboxCgroups(version=self.version)
        if self.version == 1:
            for ctrl in _V1_CONTROLLERS:
                parent = self._v1_parent(ctrl)
                if parent is None:
                    continue
                try:
                    path = parent / sandbox_id
                    path.mkdir(parents=True, exist_ok=True)
                except OSError as err:
                    _log.info("cgroup controller not usable", extra={"controller": ctrl, "error": str(err)})
                    continue
                cg.paths[ctrl] = str(path)
                cg.enforced.update(self._write_v1(ctrl, path, memory_bytes, vcpus, pids_max))
            return cg
        parent = self._v2_parent()
        if parent is None:
            return cg
        path = parent / sandbox_id
        try:
            path.mkdir(exist_ok=True)
        except OSError:
            return cg
        cg.paths["unified"] = str(path)
        cg.enforced.update(self._write_v2(path, memory_bytes, vcpus, pids_max))
        return cg

    @staticmethod
    def _write(path: Path, value: str) -> bool:
        try:
            path.write_text(value)
            return True
        except OSError:
            return False

    def _write_v1(self, ctrl: str, path: Path, memory_bytes: int, vcpus: int, pids_max: int) -> dict[str, bool]:
        if ctrl == "memory":
            ok = self._write(path / "memory.limit_in_bytes", str(memory_bytes))
            # Without this the sandbox could swap past its limit where the host has swap.
            if (path / "memory.memsw.limit_in_bytes").exists():
                self._write(path / "memory.memsw.limit_in_bytes", str(memory_bytes))
            return {"memory_bytes": ok}
        if ctrl == "cpu":
            ok = self._write(path / "cpu.cfs_period_us", str(_CFS_PERIOD_US)) and self._write(
                path / "cpu.cfs_quota_us", str(vcpus * _CFS_PERIOD_US)
            )
            return {"vcpus": ok}
        if ctrl == "pids":
            return {"pids": self._write(path / "pids.max", str(pids_max))}
        return {}

    def _write_v2(self, path: Path, memory_bytes: int, vcpus: int, pids_max: int) -> dict[str, bool]:
        result = {
            "memory_bytes": self._write(path / "memory.max", str(memory_bytes)),
            "vcpus": self._write(path / "cpu.max", f"{vcpus * _CFS_PERIOD_US} {_CFS_PERIOD_US}"),
            "pids": self._write(path / "pids.max", str(pids_max)),
        }
        if result["memory_bytes"]:
            self._write(path / "memory.swap.max", "0")
        return result
