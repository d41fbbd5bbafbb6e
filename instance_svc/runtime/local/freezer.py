"""Pausing and resuming a sandbox: the cgroup freezer where there is one, SIGSTOP of the tree otherwise.

The freezer is preferred because it stops a whole cgroup atomically (no fork escapes it) and the
kernel says when it is done. Without one, the process tree is stopped top-down twice (a process
forked in between is caught on the second pass), and `stopped` is recorded in the state file so
that a restarted instance_svc still knows the sandbox is paused and must be continued.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from instance_svc.runtime.base import RuntimeError_
from instance_svc.runtime.local import procscan, state_file
from instance_svc.runtime.local.state_file import SandboxState


def is_paused(state: SandboxState, running: bool) -> bool:
    """Whether the sandbox is paused now (stopped by signal, or its cgroup frozen)."""
    return state.stopped or (running and state.sandbox_cgroups().frozen())


def freeze(directory: Path, state: SandboxState) -> None:
    """Stop every process of the sandbox (blocking: run it in a thread)."""
    cg = state.sandbox_cgroups()
    if cg.can_freeze:
        try:
            cg.freeze()
            return
        except OSError as err:
            raise RuntimeError_(f"cannot freeze sandbox {state.sandbox_id}: {err}") from err
    for _ in range(2):
        for pid in procscan.descendants(state.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
    state.stopped = True
    state_file.save(directory, state)


def thaw(directory: Path, state: SandboxState) -> None:
    """Let a paused sandbox run again (a running one is left as it is)."""
    cg = state.sandbox_cgroups()
    if cg.can_freeze:
        try:
            cg.thaw()
        except OSError as err:
            raise RuntimeError_(f"cannot thaw sandbox {state.sandbox_id}: {err}") from err
    if state.stopped:
        continue_stopped(state)
        state.stopped = False
        state_file.save(directory, state)


def continue_stopped(state: SandboxState) -> None:
    """SIGCONT every process of a sandbox that `freeze` stopped by signal (no freezer)."""
    for pid in procscan.descendants(state.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
