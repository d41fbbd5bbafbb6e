"""What of the local runtime's sandboxes exists on the host, counted from the host, never from records.

For the fault tests: after a kill -9 of instance_svc and its restart, everything counted here must
belong to an instance that is RUNNING or PAUSED, and nothing at all once those are deleted.

Each kind is found the way an operator would look:

* directories: `<state>/instances/*`;
* processes: every process whose mount table binds something from under `<state>/instances/<id>/`
  (bubblewrap and the sandbox's processes bind the sandbox's socket dir; found from
  /proc/<pid>/mountinfo, independent of instance_svc's own bookkeeping), plus every process
  carrying the sandbox mark in its /proc/<pid>/environ (the launcher before it mounted anything);
* cgroups: directories under the runtime's group in every hierarchy of /sys/fs/cgroup;
* mounts: /proc/self/mountinfo mount points under `<state>/instances`;
* loop devices: /sys/block/loop*/loop/backing_file under `<state>/instances`.
"""

from __future__ import annotations

import os
from pathlib import Path

from instance_svc.runtime.local import procscan

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _first(rest: str) -> str:
    return rest.split("/", 1)[0]


def processes(base: Path) -> dict[str, set[int]]:
    """Sandbox id -> pids of processes holding a bind mount from its directory or carrying its mark."""
    needle = f"/{base.parent.name}/{base.name}/"
    found: dict[str, set[int]] = {}
    for sandbox_id, pids in procscan.marked(base).items():
        found.setdefault(sandbox_id, set()).update(pids)
    own_ns = os.readlink("/proc/self/ns/mnt")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"{entry.path}/ns/mnt") == own_ns:
                continue  # the host's mount table: the sandbox's own mounts are counted as mounts
            text = Path(entry.path, "mountinfo").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            root = line.split(" ", 5)[3]
            at = root.find(needle)
            if at >= 0:
                found.setdefault(_first(root[at + len(needle) :]), set()).add(int(entry.name))
    return found


def cgroups(base: Path) -> set[str]:
    """Sandbox ids with a cgroup directory under the runtime's group, in any hierarchy."""
    group = f"cyberdesk-{procscan.base_tag(base)}"
    found: set[str] = set()
    for top, dirs, _ in os.walk(CGROUP_ROOT):
        if os.path.basename(top) == group:
            found.update(dirs)
            dirs.clear()
    return found


def mounts(base: Path) -> set[str]:
    """Sandbox ids with a mount point under their directory in the host's mount table."""
    prefix = os.path.realpath(base) + "/"
    found: set[str] = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split(" ", 5)[4]
        if point.startswith(prefix):
            found.add(_first(point[len(prefix) :]))
    return found


def loops(base: Path) -> set[str]:
    """Sandbox ids whose disk image backs a loop device."""
    prefix = os.path.realpath(base) + "/"
    found: set[str] = set()
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(prefix):
            found.add(_first(backing[len(prefix) :]))
    return found


def directories(base: Path) -> set[str]:
    """Sandbox directories under the base."""
    return {p.name for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()


def everything(base: Path) -> dict[str, set[str]]:
    """Every kind, by name: the sandbox ids that have something of that kind on the host."""
    return {
        "directories": directories(base),
        "processes": set(processes(base)),
        "cgroups": cgroups(base),
        "mounts": mounts(base),
        "loop devices": loops(base),
    }


def not_owned(base: Path, owned: set[str]) -> dict[str, set[str]]:
    """What exists on the host for sandboxes outside `owned`, by kind (empty kinds left out)."""
    return {kind: ids - owned for kind, ids in everything(base).items() if ids - owned}
