"""The clock deadlines are measured and waited on, injected so that tests can drive time.

Deadlines are wall-clock microseconds since the epoch (stored, compared, shown to tenants), so
`now_us` is the wall clock. Waiting goes through the same object: a test's fake clock resolves
the scheduler's sleep when the test moves time on, and no test has to sleep for real.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """What instance_svc needs of time: the current time, and a sleep measured on the same clock."""

    def now_us(self) -> int:
        """Wall-clock time in microseconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after `seconds` of this clock's time (cancellable like asyncio.sleep)."""
        ...


class SystemClock:
    """The real clock: time.time_ns() and asyncio.sleep."""

    def now_us(self) -> int:
        """Wall-clock time in microseconds since the epoch."""
        return time.time_ns() // 1000

    async def sleep(self, seconds: float) -> None:
        """asyncio.sleep (the loop's monotonic clock)."""
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()
