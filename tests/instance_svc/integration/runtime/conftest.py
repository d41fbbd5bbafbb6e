"""Fixtures for the local runtime: a runtime on a fresh base dir, and a way to run commands inside a sandbox.

Commands run through `nsenter` into the sandbox's namespaces (as its uid 1000 "user"), after the
helper shell put itself into the sandbox's cgroups, so they are limited and frozen like the
sandbox's own processes. (The agent's ProcessService is tested with the agent; these tests must
not depend on it.)
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from instance_svc.runtime.local import LocalRuntime

T = TypeVar("T")
_ENTER = 'for f in $CG; do echo $$ > "$f"; done; exec nsenter -t "$PID" -a -S 1000 -G 1000 -- "$@"'


def _enter_argv(
    runtime: LocalRuntime, base: Path, sandbox_id: str, command: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    state = json.loads((base / sandbox_id / "state.json").read_text())
    procs = " ".join(f"{path}/cgroup.procs" for path in state["cgroups"].values())
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CG": procs, "PID": str(runtime.init_pid(sandbox_id))}
    return ["/bin/sh", "-c", _ENTER, "enter", *command], env


class Sandboxes:
    """A LocalRuntime under test plus helpers; deletes what it created at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.runtime = LocalRuntime(base)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one runtime call to completion (each test step gets its own event loop)."""
        return asyncio.run(coro)

    def sh(self, sandbox_id: str, script: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run `sh -c script` inside the sandbox; returns the finished process (stdout, stderr, returncode)."""
        argv, env = _enter_argv(self.runtime, self.base, sandbox_id, ["/bin/sh", "-c", script])
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)

    def spawn(self, sandbox_id: str, script: str) -> subprocess.Popen[bytes]:
        """Start `sh -c script` inside the sandbox in the background."""
        argv, env = _enter_argv(self.runtime, self.base, sandbox_id, ["/bin/sh", "-c", script])
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def sandboxes(tmp_path: Path) -> Iterator[Sandboxes]:
    """A local runtime on `<tmp>/state/instances`; every sandbox left at the end is deleted."""
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed; run `make setup`")
    box = Sandboxes(tmp_path / "state" / "instances")
    yield box

    async def cleanup() -> None:
        runtime = LocalRuntime(box.base)
        for info in await runtime.list():
            await runtime.delete(info.sandbox_id)

    asyncio.run(cleanup())
