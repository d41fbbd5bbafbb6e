"""The agent's worker threads (asyncio's default executor) when the instance runs out of pids.

Every blocking call of the agent (a file's stat, open, list, move; a screenshot) runs through
`asyncio.to_thread`, and the chunks of file transfers in `transfer_lanes.TRANSFER_POOL`. The
stock executor starts a thread whenever none is idle, and while a fork bomb holds the instance at
its pids limit that start fails with RuntimeError("can't start new thread"), which a gRPC handler
would turn into INTERNAL. Here the executor

* starts `MIN_THREADS` threads at once, while pids are still available, and keeps them (idle
  threads of a ThreadPoolExecutor never exit);
* when it cannot start one more, queues the call for the threads it has (it runs as soon as one is
  free: slower, never an error);
* and only with no thread at all left answers RESOURCE_EXHAUSTED naming the limit.

Both pools are `WorkerThreads`.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from cyberdesk_common.status import resource_exhausted
from guest_agent.process_cgroups import pids_exhausted_message

_log = logging.getLogger("guest_agent.worker_threads")

MIN_THREADS = 2


class WorkerThreads(ThreadPoolExecutor):
    """A ThreadPoolExecutor that degrades to queueing when no thread can be started."""

    def __init__(
        self, max_workers: int | None = None, thread_name_prefix: str = "agent-worker", min_threads: int = MIN_THREADS
    ) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        for _ in range(min_threads):
            self._adjust_thread_count()

    def _adjust_thread_count(self) -> None:
        try:
            super()._adjust_thread_count()
        except RuntimeError as err:
            if not self._threads:
                raise resource_exhausted(pids_exhausted_message("start a thread")) from err
            _log.warning("no new worker thread (pids limit?): the call waits for a busy one")


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Make `WorkerThreads` the default executor of `loop` (what asyncio.to_thread uses)."""
    loop.set_default_executor(WorkerThreads())
