"""The deadline scheduler fires each armed deadline once, in order; moved and cancelled ones obey.

Time is a FakeClock: the test moves it on and the scheduler's sleep ends, no wall-clock waiting.
"""

from __future__ import annotations

import asyncio

from instance_svc.expiry import US
from instance_svc.scheduler import Scheduler
from tests.instance_svc.fakes import FakeClock, settle


async def _scenario() -> None:
    clock = FakeClock()
    fired: list[str] = []

    async def fire(instance_id: str) -> None:
        fired.append(instance_id)

    sched = Scheduler(fire, clock)
    sched.start()
    base = clock.now_us()
    sched.arm("past", base - 10_000_000)  # already passed: fires at once
    sched.arm("b", base + 200_000)
    sched.arm("a", base + 100_000)
    sched.arm("moved", base + 50_000)
    sched.arm("moved", base + 250_000)  # moved later
    sched.arm("cancelled", base + 150_000)
    sched.cancel("cancelled")
    sched.arm("last", base + 300_000)
    await settle()
    assert fired == ["past"]
    for _ in range(30):  # 0.3 s in steps of 10 ms: each deadline fires in the step that reaches it
        await clock.advance(0.01)
    await sched.stop()
    assert fired == ["past", "a", "b", "moved", "last"]
    assert sched.deadline("a") is None


def test_fires_in_deadline_order_and_honours_moves_and_cancels() -> None:
    asyncio.run(_scenario())


async def _exact() -> None:
    clock = FakeClock()
    fired: list[tuple[str, int]] = []

    async def fire(instance_id: str) -> None:
        fired.append((instance_id, clock.now_us()))

    sched = Scheduler(fire, clock)
    sched.start()
    start = clock.now_us()
    sched.arm("x", start + 10 * US)
    await settle()
    assert clock.sleeping == 1  # one timer for the earliest deadline, no periodic sweep
    await clock.advance(10 - 1e-6)
    assert fired == []  # one microsecond early: nothing
    await clock.advance(1e-6)
    assert fired == [("x", start + 10 * US)]
    assert sched.deadline("x") is None
    await settle()
    assert clock.sleeping == 0  # nothing armed: the task waits for the next arm, not for time
    await sched.stop()


def test_a_deadline_fires_at_its_microsecond_and_not_before() -> None:
    asyncio.run(_exact())


async def _earlier_arm_wakes() -> None:
    clock = FakeClock()
    fired: list[str] = []

    async def fire(instance_id: str) -> None:
        fired.append(instance_id)

    sched = Scheduler(fire, clock)
    sched.start()
    now = clock.now_us()
    sched.arm("late", now + 3600 * US)
    await settle()
    sched.arm("soon", now + 1 * US)  # earlier than the sleep in progress: it must wake and re-plan
    await clock.advance(1)
    assert fired == ["soon"]
    await clock.advance(3599)
    assert fired == ["soon", "late"]
    await sched.stop()


def test_an_earlier_deadline_interrupts_the_current_sleep() -> None:
    asyncio.run(_earlier_arm_wakes())


async def _failing_action() -> None:
    clock = FakeClock()
    fired: list[str] = []

    async def fire(instance_id: str) -> None:
        fired.append(instance_id)
        if instance_id == "bad":
            raise RuntimeError("the action failed")

    sched = Scheduler(fire, clock)
    sched.start()
    now = clock.now_us()
    sched.arm("bad", now + 1 * US)
    sched.arm("good", now + 2 * US)
    await clock.advance(2)
    await sched.stop()
    assert fired == ["bad", "good"]  # a failing action does not stop the timers


def test_a_failing_action_does_not_stop_the_scheduler() -> None:
    asyncio.run(_failing_action())
