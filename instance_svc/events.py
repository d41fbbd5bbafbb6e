"""Publishing state changes on the Redis stream `cyberdesk:events`, at least once; WatchInstances' reader.

Each state change writes an outbox row in the same SQLite transaction (see store.py). The
publisher drains the outbox in order: XADD each event, then mark the rows sent. If Redis is down
the rows wait and the publisher retries with back-off; if instance_svc dies between XADD and the
mark, the event is sent again after the restart (at least once: consumers de-duplicate on
`event_id`).

Watchers read the same stream through the shared tail reader (`cyberdesk_common.lifecycle_events`,
which also defines the record and the stream name), so WatchInstances shows exactly what billing
sees, from whichever instance_svc replica made the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from cyberdesk_common import lifecycle_events
from cyberdesk_common.lifecycle_events import STREAM, EventStreamUnavailable, LifecycleEvent
from cyberdesk_common.status import RpcError
from instance_svc.store import Store

# Approximate cap of the stream: billing consumes far faster than this fills.
STREAM_MAXLEN = 1_000_000

_log = logging.getLogger("instance_svc.events")


class Publisher:
    """Drains the outbox to the Redis stream in the background."""

    def __init__(self, store: Store, redis_url: str) -> None:
        self._store = store
        self._redis: aioredis.Redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._down = False

    def start(self) -> None:
        """Start draining (inside the running loop)."""
        self._task = asyncio.create_task(self._run(), name="event-publisher")

    def kick(self) -> None:
        """New outbox rows exist: drain now rather than at the next retry."""
        self._kick.set()

    async def stop(self) -> None:
        """One last drain attempt (bounded), then stop; unsent rows wait for the next start."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(TimeoutError, RedisError, OSError):
            await asyncio.wait_for(self.drain(), timeout=2.0)
        await self._redis.aclose()

    async def drain(self) -> int:
        """Publish every unsent event; returns how many were sent."""
        total = 0
        while batch := self._store.unsent():
            pipe = self._redis.pipeline(transaction=False)
            for _seq, event in batch:
                pipe.xadd(STREAM, event.fields(), maxlen=STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]
            await pipe.execute()
            self._store.mark_sent([seq for seq, _ in batch])
            total += len(batch)
        return total

    async def _run(self) -> None:
        delay = 0.1
        while True:
            self._kick.clear()
            try:
                await self.drain()
                if self._down:
                    _log.info("redis is reachable again; outbox drained")
                self._down, delay = False, 0.1
                await self._kick.wait()
            except (RedisError, OSError) as err:
                if not self._down:
                    _log.warning("redis unreachable; events wait in the outbox", extra={"error": str(err)})
                self._down = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), timeout=delay)
                delay = min(delay * 2, 5.0)


async def watch(redis_url: str, tenant: str, instance_id: str = "") -> AsyncIterator[tuple[str, LifecycleEvent]]:
    """Yield (stream id, event) for the tenant's changes (of `instance_id` when given) from now on.

    One Redis connection per watcher; UNAVAILABLE when Redis cannot be reached.
    """
    client = lifecycle_events.connect(redis_url)
    try:
        async for entry_id, event in lifecycle_events.tail(client):
            if event.tenant != tenant or (instance_id and event.instance_id != instance_id):
                continue
            yield entry_id, event
    except EventStreamUnavailable as err:
        # The caller is a tenant (through the gateway): the condition, not where Redis lives.
        _log.warning("a watcher lost the event stream", extra={"error": str(err)})
        raise RpcError(grpc.StatusCode.UNAVAILABLE, "the event stream is unavailable; retry shortly") from None
    finally:
        await client.aclose()
