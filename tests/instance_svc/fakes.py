"""In-memory stand-ins for the unit tests of instance_svc: a Runtime, a Clock and an event publisher.

They replace only what the unit layer must not touch (sandboxes, the wall clock, Redis); the
store stays the real SQLite one in a temporary directory. The real runtime, clock and publisher
are exercised by tests/instance_svc/integration.

`FakeRuntime` keeps the `Runtime` contract of instance_svc/runtime/base.py: create returns a
running sandbox, delete is idempotent, pause/resume/snapshot need an existing running sandbox and
raise `RuntimeError_` otherwise. A test makes the next call of an operation fail with `fail_next`.

`FakeClock` is wall-clock microseconds that move only when the test calls `advance`; a `sleep`
on it returns when the clock reaches its end, so the scheduler's timers fire without real waits.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path

from instance_svc.expiry import US
from instance_svc.runtime.base import (
    AgentEndpoint,
    Limit,
    RuntimeError_,
    SandboxInfo,
    SandboxSpec,
    SnapshotResult,
    Unsupported,
)

# How many times `settle` lets the event loop run: far more than the few hops from a woken
# sleep to a finished deadline action, and still no wall-clock time.
_SETTLE_STEPS = 200


async def settle(until: Callable[[], bool] | None = None, steps: int = _SETTLE_STEPS) -> None:
    """Let the event loop run the work that is ready (no wall-clock sleep); fail if `until` never holds."""
    for _ in range(steps):
        if until is not None and until():
            return
        await asyncio.sleep(0)
    if until is not None:
        assert until(), f"condition still false after {steps} event-loop steps"


class FakeClock:
    """A `Clock` (instance_svc/clock.py) whose time moves only by `advance`."""

    def __init__(self, start_us: int = 1_700_000_000 * US) -> None:
        self._now = start_us
        self._sleepers: list[tuple[int, asyncio.Future[None]]] = []

    def now_us(self) -> int:
        """The fake time, microseconds since the epoch."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Return once `advance` has moved the clock `seconds` on (cancellable)."""
        # round(): delays are computed as (deadline - now) / US, and this recovers the integer.
        due = self._now + round(seconds * US)
        if due <= self._now:
            await asyncio.sleep(0)
            return
        entry = (due, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            with contextlib.suppress(ValueError):
                self._sleepers.remove(entry)

    @property
    def sleeping(self) -> int:
        """How many sleeps are waiting for the clock to move."""
        return len(self._sleepers)

    async def advance(self, seconds: float) -> None:
        """Move the clock on, wake the sleeps that are due, and let the woken work run."""
        self._now += round(seconds * US)
        for due, future in list(self._sleepers):
            if due <= self._now and not future.done():
                future.set_result(None)
        await settle()


class FakePublisher:
    """The lifecycle's `EventPublisher` without Redis: the outbox rows stay in the real store."""

    def __init__(self) -> None:
        self.started = False
        self.stopped = False
        self.kicks = 0

    def start(self) -> None:
        """Nothing to drain to."""
        self.started = True

    def kick(self) -> None:
        """Count: every state change must announce new outbox rows."""
        self.kicks += 1

    async def stop(self) -> None:
        """Nothing to flush."""
        self.stopped = True


def _write_archive(dest: Path, content: bytes) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(content)
    return dest.stat().st_size


@dataclass
class FakeSandbox:
    """One sandbox of the fake runtime."""

    spec: SandboxSpec
    running: bool = True
    paused: bool = False


class FakeRuntime:
    """An in-memory `Runtime`: sandboxes are records, calls are logged in `calls`."""

    name = "fake"

    def __init__(self, supports_pause: bool = True) -> None:
        self.supports_pause = supports_pause
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.calls: list[tuple[str, str]] = []  # (operation, sandbox id)
        self.fail_next: dict[str, RuntimeError_] = {}  # operation -> what its next call raises
        self.closed = False
        self.watches: dict[str, Callable[[str, str], None]] = {}

    def _enter(self, operation: str, sandbox_id: str) -> None:
        self.calls.append((operation, sandbox_id))
        failure = self.fail_next.pop(operation, None)
        if failure is not None:
            raise failure

    def _running(self, sandbox_id: str) -> FakeSandbox:
        box = self.sandboxes.get(sandbox_id)
        if box is None:
            raise RuntimeError_(f"sandbox {sandbox_id} does not exist")
        if not box.running:
            raise RuntimeError_(f"sandbox {sandbox_id} is not running")
        return box

    def _info(self, box: FakeSandbox) -> SandboxInfo:
        sandbox_id = box.spec.sandbox_id
        return SandboxInfo(
            sandbox_id=sandbox_id,
            endpoint=AgentEndpoint(target=f"unix:///fake/{sandbox_id}/agent.sock", token=f"token-{sandbox_id}"),
            running=box.running,
            paused=box.paused,
            limits=(
                Limit("memory_bytes", box.spec.memory_mib * 1024 * 1024, "cgroup"),
                Limit("vcpus", box.spec.vcpus, "cgroup"),
            ),
        )

    def vanish(self, sandbox_id: str) -> None:
        """The sandbox dies behind the runtime's back (host reboot, OOM killer)."""
        self.sandboxes[sandbox_id].running = False

    def die(self, sandbox_id: str, reason: str) -> None:
        """The sandbox dies while watched: its watcher hears `reason` (as LocalRuntime's pidfd watch says it)."""
        self.sandboxes[sandbox_id].running = False
        handler = self.watches.pop(sandbox_id, None)
        if handler is not None:
            handler(sandbox_id, reason)

    def watch(self, sandbox_id: str, on_exit: Callable[[str, str], None]) -> None:
        """Remember the handler; a sandbox that is gone already is reported at once."""
        box = self.sandboxes.get(sandbox_id)
        if box is None or not box.running:
            asyncio.get_running_loop().call_soon(on_exit, sandbox_id, "the guest agent was gone")
            return
        self.watches[sandbox_id] = on_exit

    async def sweep(self, keep: Collection[str]) -> builtins.list[str]:
        """Delete every sandbox but `keep` (what the start-up reconciliation leaves to the runtime)."""
        gone = sorted(set(self.sandboxes) - set(keep))
        for sandbox_id in gone:
            await self.delete(sandbox_id)
        return gone

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        """Record a running sandbox."""
        self._enter("create", spec.sandbox_id)
        if spec.sandbox_id in self.sandboxes:
            raise RuntimeError_(f"sandbox {spec.sandbox_id} already exists")
        box = FakeSandbox(replace(spec, env=dict(spec.env)))
        self.sandboxes[spec.sandbox_id] = box
        return self._info(box)

    async def delete(self, sandbox_id: str) -> None:
        """Forget the sandbox; a gone one is not an error."""
        self._enter("delete", sandbox_id)
        self.sandboxes.pop(sandbox_id, None)
        self.watches.pop(sandbox_id, None)

    async def pause(self, sandbox_id: str) -> None:
        """Mark the sandbox frozen (Unsupported when built without pause)."""
        self._enter("pause", sandbox_id)
        if not self.supports_pause:
            raise Unsupported("this fake host has no freezer")
        self._running(sandbox_id).paused = True

    async def resume(self, sandbox_id: str) -> None:
        """Thaw the sandbox."""
        self._enter("resume", sandbox_id)
        self._running(sandbox_id).paused = False

    async def snapshot(self, sandbox_id: str, dest: Path) -> SnapshotResult:
        """Write a small archive stand-in to `dest`."""
        self._enter("snapshot", sandbox_id)
        self._running(sandbox_id)
        size = await asyncio.to_thread(_write_archive, dest, f"layer of {sandbox_id}".encode())
        return SnapshotResult(path=dest, size_bytes=size, includes_memory=False)

    async def list(self) -> list[SandboxInfo]:
        """Every recorded sandbox, running or not."""
        return [self._info(box) for box in self.sandboxes.values()]

    async def close(self) -> None:
        """Sandboxes outlive the runtime object, as with the real one."""
        self.closed = True
