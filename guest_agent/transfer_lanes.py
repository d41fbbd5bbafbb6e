"""Lanes: the ordered jobs of one file transfer, run one at a time in the transfers' thread pool.

A transfer overlaps its disk and hashing work with the network by keeping one job per lane in
flight (an upload has a hashing lane and a writing lane, a download one reading lane). Pure
concurrency machinery with no knowledge of files, so it can be tested on its own.

Invariants
----------
* At most one job per lane is queued or running: `submit` first waits for the previous one, so
  the memory a transfer holds stays flat and the jobs of a lane run in submission order.
* A job's failure surfaces at the next `submit` or at `drain`, on the event loop.
* The concurrent future is kept, not only an asyncio wrapper of it: a cancelled call cancels the
  wrapper at once while the thread still runs, and what the job uses (a file descriptor) must be
  released only after the thread is done (`when_idle`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Iterable
from typing import Any

from guest_agent.worker_threads import WorkerThreads

# Threads for the chunks of transfers (hashing, writing, reading ahead): separate from the default
# pool so a burst of stat/list calls does not queue behind them, and sized so that a few
# transfers at once each have their lanes running. WorkerThreads: a pids limit reached (a fork bomb)
# makes a transfer wait for a busy thread instead of failing with INTERNAL.
TRANSFER_POOL = WorkerThreads(max_workers=8, thread_name_prefix="files")


class Lane:
    """Jobs of one transfer that must run in order: one at a time in `TRANSFER_POOL` (see the module rules)."""

    def __init__(self, pool: concurrent.futures.Executor = TRANSFER_POOL) -> None:
        self._pool = pool
        self.job: concurrent.futures.Future[Any] | None = None

    async def submit(self, fn: Callable[..., object], *args: object) -> None:
        """Queue `fn(*args)` once the previous job is done (raising that job's error, if it failed)."""
        await self.drain()
        self.job = self._pool.submit(fn, *args)

    async def drain(self) -> Any:
        """Wait for the job in flight; returns its result (None when there is none)."""
        if self.job is None:
            return None
        # A job already done is collected without a trip through the event loop (wrapping it
        # would still cost a wake-up of the loop and a turn of it per chunk).
        result = self.job.result() if self.job.done() else await asyncio.wrap_future(self.job)
        self.job = None
        return result


def _running(lanes: Iterable[Lane]) -> list[concurrent.futures.Future[Any]]:
    return [lane.job for lane in lanes if lane.job is not None and not lane.job.done()]


async def settle(lanes: Iterable[Lane]) -> None:
    """Wait until no job of `lanes` is running (their errors are not raised: they were, or do not matter)."""
    running = [asyncio.wrap_future(job) for job in _running(lanes)]
    if running:
        await asyncio.wait(running)
        for future in running:
            future.exception()  # Retrieved, so asyncio does not log it as never retrieved.


def when_idle(lanes: Iterable[Lane], release: Callable[[], None]) -> None:
    """Call `release` now, or once the jobs still running in `lanes` have finished (in their thread)."""
    running = _running(lanes)
    if not running:
        release()
        return
    left = [len(running)]
    # The done callbacks run in the pool's threads, possibly two at once: the count is locked so
    # exactly one of them, the last, releases.
    lock = threading.Lock()

    def one_done(_: object) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            release()

    for job in running:
        job.add_done_callback(one_done)
