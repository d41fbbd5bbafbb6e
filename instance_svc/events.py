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
from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from cyberdesk_common import lifecycle_events
from cyberdesk_common.lifecycle_events import STREAM, EventStreamUnavailable, LifecycleEvent
from cyberdesk_common.status import RpcError
from instance_svc.store import Store

# Approximate cap of the stream (the documented retention of watch cursors, see
# lifecycle_events.RETENTION_EVENTS): billing consumes far faster than this fills.
STREAM_MAXLEN = lifecycle_events.RETENTION_EVENTS

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


_DEDUP_WINDOW = 4096

# Response header of WatchInstances: the cursor the watch starts after (see instance.proto).
WATCH_CURSOR_METADATA = "cyberdesk-watch-cursor"


class Watch:
    """One watcher's reader: `start` is the cursor it resumes after; iterate for (stream id, event).

    Made by `open_watch`, which has already checked the cursor against the stream's bounds, so a
    caller can announce `start` (the watch is in place) before the first event. Holds one Redis
    connection, closed when the iteration ends.
    """

    def __init__(self, client: aioredis.Redis, start: str, tenant: str, instance_id: str) -> None:
        self._client = client
        self.start = start
        self._tenant = tenant
        self._instance_id = instance_id

    async def __aiter__(self) -> AsyncIterator[tuple[str, LifecycleEvent]]:
        # The publisher sends at least once: an event re-sent after a crash between XADD and its
        # outbox mark is a second entry with the same event_id, usually right after the first.
        # A bounded window of recent ids drops those within one watch.
        seen: OrderedDict[str, None] = OrderedDict()
        try:
            async with contextlib.aclosing(lifecycle_events.tail(self._client, after=self.start)) as entries:
                async for entry_id, event in entries:
                    if event.tenant != self._tenant or (self._instance_id and event.instance_id != self._instance_id):
                        continue
                    if event.event_id in seen:
                        continue
                    seen[event.event_id] = None
                    if len(seen) > _DEDUP_WINDOW:
                        seen.popitem(last=False)
                    yield entry_id, event
        except EventStreamUnavailable as err:
            raise _unavailable(err) from None
        finally:
            await self._client.aclose()

    async def close(self) -> None:
        """Release the connection of a watch that is not iterated."""
        await self._client.aclose()


def _unavailable(err: EventStreamUnavailable) -> RpcError:
    # The caller is a tenant (through the gateway): the condition, not where Redis lives. Ending
    # the call (rather than retrying inside it) is the contract: the client resumes with its last
    # cursor and misses nothing, and a watch never hangs silently on a dead store.
    _log.warning("a watcher lost the event stream", extra={"error": str(err)})
    return RpcError(grpc.StatusCode.UNAVAILABLE, "the event stream is unavailable; retry shortly")


async def open_watch(redis_url: str, tenant: str, instance_id: str = "", cursor: str = "") -> Watch:
    """A watch of the tenant's changes (of `instance_id` when given) after `cursor`, or from now.

    INVALID_ARGUMENT for a malformed cursor, OUT_OF_RANGE when the stream no longer holds every
    change after it (trimmed past it, or reset), UNAVAILABLE when Redis cannot be reached.
    """
    if cursor:
        try:
            position = lifecycle_events.parse_cursor(cursor)
        except lifecycle_events.BadCursor as err:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"cursor: {err}") from None
    client = lifecycle_events.connect(redis_url)
    try:
        if cursor:
            problem = (await lifecycle_events.bounds(client)).problem(position)
            if problem is not None:
                raise RpcError(grpc.StatusCode.OUT_OF_RANGE, f"cursor {cursor}: {problem}")
            start = cursor
        else:
            start = await lifecycle_events.last_id(client)
    except EventStreamUnavailable as err:
        await client.aclose()
        raise _unavailable(err) from None
    except BaseException:
        await client.aclose()
        raise
    return Watch(client, start, tenant, instance_id)


async def watch(
    redis_url: str, tenant: str, instance_id: str = "", cursor: str = ""
) -> AsyncIterator[tuple[str, LifecycleEvent]]:
    """Yield (stream id, event) for the tenant's changes (of `instance_id` when given) after `cursor` or from now.

    One Redis connection per watcher; the errors of `open_watch`, and UNAVAILABLE when Redis goes away.
    """
    opened = await open_watch(redis_url, tenant, instance_id, cursor)
    async for item in opened:
        yield item
