"""/proc scans: is a recorded pid still the process we started, and which processes a sandbox holds."""

from __future__ import annotations

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
