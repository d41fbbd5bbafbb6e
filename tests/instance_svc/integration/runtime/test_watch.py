"""The pidfd watch of instance_svc/runtime/local/watch.py on real processes (no sandbox needed).

A shell stands in for the outer bubblewrap and its `sleep` child for the agent: the watch checks
the same relations (the agent's parent is bubblewrap, bubblewrap's start time), and learns how a
process ended from the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess

from instance_svc.runtime.local import procscan
from instance_svc.runtime.local.watch import Watcher, describe

_WAIT_S = 10.0


def _pair() -> tuple[subprocess.Popen[bytes], int]:
    shell = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE)
    assert shell.stdout is not None
    return shell, int(shell.stdout.readline())


def test_describe_says_how_a_process_ended() -> None:
    assert describe(signal.SIGKILL) == " (killed by SIGKILL)"  # a wait status: terminated by signal 9
    assert describe(3 << 8) == " (exit status 3)"
    assert describe(None) == ""


def _watch_and_kill(target: str) -> list[tuple[str, str]]:
    shell, agent = _pair()
    heard: list[tuple[str, str]] = []

    async def main() -> None:
        watcher = Watcher()
        done = asyncio.Event()

        def on_exit(sandbox_id: str, reason: str) -> None:
            heard.append((sandbox_id, reason))
            done.set()

        start = procscan.start_time(shell.pid)
        assert start is not None
        watcher.watch("sb-x", agent, shell.pid, start, shell, on_exit)
        os.kill(agent if target == "agent" else shell.pid, signal.SIGKILL)
        await asyncio.wait_for(done.wait(), _WAIT_S)
        await asyncio.sleep(0.05)  # a second report would arrive by now
        watcher.close()

    try:
        asyncio.run(main())
    finally:
        for pid in (agent, shell.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shell.wait()
    return heard


def test_a_killed_agent_is_reported_once_with_its_signal() -> None:
    assert _watch_and_kill("agent") == [("sb-x", "the guest agent exited (killed by SIGKILL)")]


def test_a_killed_bubblewrap_is_reported_once_with_its_signal() -> None:
    assert _watch_and_kill("bwrap") == [("sb-x", "the sandbox's bubblewrap process exited (killed by SIGKILL)")]


def test_an_unwatched_sandbox_reports_nothing_and_a_gone_one_at_once() -> None:
    shell, agent = _pair()
    heard: list[str] = []

    async def main() -> None:
        watcher = Watcher()
        start = procscan.start_time(shell.pid) or 0
        watcher.watch("sb-a", agent, shell.pid, start, shell, lambda s, r: heard.append(s))
        watcher.unwatch("sb-a")  # what a delete does before it kills
        os.kill(agent, signal.SIGKILL)
        shell.wait()
        # A sandbox whose processes are gone already (a pid reused, or simply exited) is reported at once.
        watcher.watch("sb-b", agent, shell.pid, start, None, lambda s, r: heard.append(f"{s}: {r}"))
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.01)
        watcher.close()

    asyncio.run(main())
    assert heard == ["sb-b: the guest agent was gone when instance_svc started watching it"]
