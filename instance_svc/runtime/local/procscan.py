"""/proc scans: is a recorded pid still the process we started, which processes a sandbox holds, and whose they are."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def start_time(pid: int) -> int | None:
    """Start time of `pid` (field 22 of /proc/pid/stat), or None if it is gone or a zombie.

    A pid and its start time together name one process: comparing both guards against pid reuse
    after a sandbox died while instance_svc was down.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def descendants(root: int) -> list[int]:
    """Every descendant of `root` (scans /proc: /proc/<pid>/task/<tid>/children may be missing)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


# Every process a sandbox starts from the host (the launcher, bubblewrap, the sandbox's PID 1 and
# what it forks, slirp4netns, the DNS guard) carries this variable from its first exec, set to
# `mark(base, sandbox_id)`. It is how the start-up sweep finds processes of a sandbox that no
# record knows (instance_svc died between the spawn and the state file saying so): /proc/<pid>/environ
# is the environment a process was exec'd with, which a sandbox cannot change from inside for the
# processes outside its pid namespace. The value names no host path (the tenant sees it in `env`).
MARK_ENV = "CYBERDESK_SANDBOX_MARK"


def base_tag(base: Path) -> str:
    """A short opaque name of one runtime's base directory (several instance_svc may share a host)."""
    return hashlib.sha256(os.path.realpath(base).encode()).hexdigest()[:16]


def mark(base: Path, sandbox_id: str) -> str:
    """The value of MARK_ENV for the processes of `sandbox_id` under `base`."""
    return f"{base_tag(base)}/{sandbox_id}"


def marked(base: Path) -> dict[str, list[int]]:
    """Live processes carrying the mark of a sandbox under `base`, by sandbox id (scans /proc; needs root)."""
    prefix = f"{MARK_ENV}={base_tag(base)}/".encode()
    found: dict[str, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(prefix):
                found.setdefault(item[len(prefix) :].decode(errors="replace"), []).append(int(entry.name))
                break
    return found


def parent(pid: int) -> int | None:
    """The parent pid of `pid` (field 4 of /proc/pid/stat), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[1])
