"""The deadline scheduler fires each armed deadline once, in order; moved and cancelled ones obey."""

from __future__ import annotations

import asyncio

from instance_svc.scheduler import Scheduler, now_us


async def _scenario() -> None:
    fired: list[str] = []
    done = asyncio.Event()

    async def fire(instance_id: str) -> None:
        fired.append(instance_id)
        if instance_id == "last":
            done.set()

    sched = Scheduler(fire)
    sched.start()
    base = now_us()
    sched.arm("past", base - 10_000_000)  # already passed: fires at once
    sched.arm("b", base + 200_000)
    sched.arm("a", base + 100_000)
    sched.arm("moved", base + 50_000)
    sched.arm("moved", base + 250_000)  # moved later
    sched.arm("cancelled", base + 150_000)
    sched.cancel("cancelled")
    sched.arm("last", base + 300_000)
    await asyncio.wait_for(done.wait(), 30)
    await sched.stop()
    assert fired == ["past", "a", "b", "moved", "last"]
    assert sched.deadline("a") is None


def test_fires_in_deadline_order_and_honours_moves_and_cancels() -> None:
    asyncio.run(_scenario())
