"""Where a sandbox is killed and its cgroups, disk and directory removed (idempotent)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from instance_svc.runtime.local import disk, freezer, network, procscan
from instance_svc.runtime.local.cgroups import SandboxCgroups
from instance_svc.runtime.local.state_file import SandboxState

_log = logging.getLogger("instance_svc.runtime.local")


def destroy(
    directory: Path,
    state: SandboxState | None,
    child: subprocess.Popen[bytes] | None,
    found: SandboxCgroups | None = None,
    strays: Sequence[int] = (),
) -> None:
    """Kill every process of the sandbox, remove its cgroups, its disk and `directory` (blocking: run it in a thread).

    `child` is the outer bubblewrap when this instance_svc started it (None after a restart).
    `found` are the sandbox's cgroups as they exist now (found by name: a create cut short before
    its state file listed them), `strays` processes carrying its mark (procscan.marked: spawned
    before the state file had their pid); both are removed with what the state file records.
    """
    for pid in strays:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    cg = state.sandbox_cgroups() if state is not None else SandboxCgroups(version=found.version if found else 0)
    if found is not None:
        for ctrl, path in found.paths.items():
            cg.paths.setdefault(ctrl, path)
        cg.version = cg.version or found.version
    # SIGKILL of a pid namespace's PID 1 kills every process in it; the cgroup sweep
    # catches anything that raced, and the frozen ones are thawed so they can die.
    if state is not None and state.init_pid and state.pid_start and procscan.start_time(state.pid) == state.pid_start:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(state.init_pid, signal.SIGKILL)
        if state.stopped:
            freezer.continue_stopped(state)
    cg.kill_all()
    cg.remove()
    if child is not None:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()  # the outer bubblewrap ends with its sandbox; this is a backstop
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)
    elif state is not None and state.pid_start and procscan.start_time(state.pid) == state.pid_start:
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signal.SIGKILL)
    # slirp4netns exits with its sandbox by itself (its exit fd); killing it here makes that
    # immediate and also covers a start that failed before the sandbox ran.
    network.stop(directory)
    # After the processes: the disk's mount and loop device go once nothing of the sandbox holds
    # them. Also without a state file (a create that failed before writing it mounted the disk).
    left = disk.release(directory)
    if left:
        _log.warning("disk of %s not fully released: %s", directory.name, ", ".join(left))
    shutil.rmtree(directory, ignore_errors=True)
