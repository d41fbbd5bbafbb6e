"""Lanes of a transfer alone: jobs in order, one in flight, errors at the next step, late release.

In-process with plain Python jobs (no file, no agent); threading events hold a job in its thread
so that the test decides when it ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import pytest

from guest_agent.transfer_lanes import Lane, settle, when_idle


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_jobs_run_in_order_and_drain_returns_the_last_result() -> None:
    async def scenario() -> None:
        lane = Lane()
        seen: list[int] = []

        def job(n: int) -> int:
            seen.append(n)
            return n * 10

        for n in range(20):
            await lane.submit(job, n)
        assert await lane.drain() == 190
        assert seen == list(range(20))
        assert lane.job is None
        assert await lane.drain() is None  # nothing in flight

    _run(scenario)


def test_submit_waits_for_the_job_in_flight() -> None:
    async def scenario() -> None:
        lane = Lane()
        release = threading.Event()
        await lane.submit(release.wait, 5)
        second = asyncio.create_task(lane.submit(lambda: None))
        await asyncio.sleep(0.05)
        assert not second.done()  # at most one job per lane: memory stays flat
        release.set()
        await second
        await lane.drain()

    _run(scenario)


def test_a_failed_job_raises_at_the_next_submit_and_at_drain() -> None:
    async def scenario() -> None:
        def fail() -> None:
            raise OSError(28, "No space left on device")

        lane = Lane()
        await lane.submit(fail)
        with pytest.raises(OSError, match="No space"):
            await lane.submit(lambda: None)
        other = Lane()
        await other.submit(fail)
        with pytest.raises(OSError, match="No space"):
            await other.drain()

    _run(scenario)


def test_settle_waits_for_running_jobs_without_raising_their_errors() -> None:
    async def scenario() -> None:
        release = threading.Event()
        finished: list[str] = []

        def slow_failure() -> None:
            release.wait(5)
            finished.append("slow")
            raise OSError(5, "Input/output error")

        busy, idle = Lane(), Lane()
        await busy.submit(slow_failure)
        settling = asyncio.create_task(settle([busy, idle]))
        await asyncio.sleep(0.05)
        assert not settling.done()
        release.set()
        await settling
        assert finished == ["slow"]

    _run(scenario)


def test_when_idle_releases_at_once_when_nothing_runs() -> None:
    released: list[bool] = []
    when_idle([Lane(), Lane()], lambda: released.append(True))
    assert released == [True]


def test_when_idle_releases_once_after_the_last_running_job() -> None:
    async def scenario() -> None:
        first, second = threading.Event(), threading.Event()
        a, b = Lane(), Lane()
        await a.submit(first.wait, 5)
        await b.submit(second.wait, 5)
        released: list[str] = []
        done = threading.Event()

        def release() -> None:
            released.append(threading.current_thread().name)
            done.set()

        when_idle([a, b], release)
        assert released == []  # a cancelled call must not close a descriptor under a running job
        first.set()
        await asyncio.sleep(0.05)
        assert released == []
        second.set()
        assert await asyncio.to_thread(done.wait, 5)
        assert len(released) == 1
        assert released[0].startswith("files")  # run in the pool's thread, after the job

    _run(scenario)
