"""Exact deadline timers: one task sleeping until the earliest deadline, no periodic sweep.

Deadlines are wall-clock microseconds (they are stored and survive restarts). A heap holds
(deadline, instance_id) pairs; `_armed` holds the current deadline of each instance, so a moved or
cancelled deadline leaves a stale heap entry that is skipped when it surfaces (lazy deletion).
Arming wakes the task, which recomputes its sleep.

Time comes from an injected `Clock` (instance_svc/clock.py): the real one in production, a fake
one in the unit tests, which move time on instead of sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable

from instance_svc.clock import SYSTEM_CLOCK, Clock
from instance_svc.expiry import US, delay_seconds

_log = logging.getLogger("instance_svc.scheduler")
# Deadlines are wall-clock, a sleep is not: waking at least hourly notices a stepped clock.
_MAX_SLEEP_S = 3600.0


class Scheduler:
    """Calls `fire(instance_id)` once at each armed deadline, as measured by `clock`."""

    def __init__(self, fire: Callable[[str], Awaitable[None]], clock: Clock = SYSTEM_CLOCK) -> None:
        self._fire = fire
        self._clock = clock
        self._heap: list[tuple[int, str]] = []
        self._armed: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Start the timer task (inside the running loop)."""
        self._task = asyncio.create_task(self._run(), name="deadline-scheduler")

    async def stop(self) -> None:
        """Stop the timer task; deadlines stay stored and are re-armed by the next start."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    def arm(self, instance_id: str, deadline_us: int) -> None:
        """Fire at `deadline_us` (at once when it has passed), replacing any earlier deadline."""
        self._armed[instance_id] = deadline_us
        heapq.heappush(self._heap, (deadline_us, instance_id))
        self._wake.set()

    def cancel(self, instance_id: str) -> None:
        """Forget the instance's deadline."""
        self._armed.pop(instance_id, None)

    def deadline(self, instance_id: str) -> int | None:
        """The armed deadline of an instance, if any."""
        return self._armed.get(instance_id)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            while self._heap and self._armed.get(self._heap[0][1]) != self._heap[0][0]:
                heapq.heappop(self._heap)  # moved or cancelled
            if not self._heap:
                await self._wake.wait()
                continue
            deadline_us, instance_id = self._heap[0]
            delay = delay_seconds(deadline_us, self._clock.now_us())
            if delay > 0:
                # Sleep until the deadline, or less when a new earlier deadline wakes us.
                await self._sleep_or_wake(min(delay, _MAX_SLEEP_S))
                continue
            heapq.heappop(self._heap)
            del self._armed[instance_id]
            late_ms = round((self._clock.now_us() - deadline_us) / US * 1000, 3)
            _log.info("deadline reached", extra={"instance_id": instance_id, "late_ms": late_ms})
            task = asyncio.create_task(self._call(instance_id))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _sleep_or_wake(self, seconds: float) -> None:
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            woken.cancel()
            await asyncio.gather(sleeper, woken, return_exceptions=True)

    async def _call(self, instance_id: str) -> None:
        try:
            await self._fire(instance_id)
        except Exception:
            _log.exception("deadline action failed", extra={"instance_id": instance_id})
