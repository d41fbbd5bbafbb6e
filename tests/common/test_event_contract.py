"""The lifecycle event contract: what the producer writes is what every consumer reads.

Producer: a real Store (its outbox rows written with each state change) drained by the real
Publisher into a real redis-server. Consumers: the gateway's follower (`follow_events`, which
drives the route cache) and WatchInstances' reader (`instance_svc.events.watch`). Both must see
exactly the producer's records, in order, and the stream entries must be exactly their fields.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from cyberdesk_common.lifecycle_events import STREAM, LifecycleEvent
from gateway_svc.routing import follow_events
from instance_svc import events, quotas
from instance_svc.expiry import US, TimeoutAction
from instance_svc.states import State
from instance_svc.store import InstanceRecord, Store
from tests.common.event_recorder import RecordingRoutes

T = TypeVar("T")


def _rec(n: int, tenant: str) -> InstanceRecord:
    return InstanceRecord(
        id=f"i-{n:012x}",
        tenant=tenant,
        template="base",
        vcpus=2,
        memory_mib=1024,
        state=State.PENDING,
        create_time_us=1_000 * US + n,
        expire_time_us=2_000 * US,
        timeout_us=300 * US,
        timeout_action=TimeoutAction.TERMINATE,
        runtime="local",
    )


def _produce(store: Store) -> list[LifecycleEvent]:
    """Every state and both shapes of old_state (none, a state), a message, and two tenants."""
    one, _ = store.insert_within_quota(_rec(1, "t"), quotas.Limits())
    for step, state in enumerate((State.STARTING, State.RUNNING, State.PAUSED, State.RUNNING, State.STOPPING), 1):
        store.transition(one.id, state, 1_000 * US + step, "paused by the deadline" if state is State.PAUSED else None)
    store.transition(one.id, State.TERMINATED, 1_000 * US + 9, "deleted")
    other, _ = store.insert_within_quota(_rec(2, "u"), quotas.Limits())
    store.transition(other.id, State.FAILED, 1_000 * US + 10, "no room")
    return [event for _, event in store.unsent()]


async def _until_blocked_readers(url: str, count: int) -> None:
    """Until `count` clients of this database are blocked in XREAD: each has read the stream's end."""
    admin = aioredis.Redis.from_url(url, decode_responses=True)
    db = url.rsplit("/", 1)[1]
    try:
        deadline = time.monotonic() + 10
        while True:
            clients: Any = await admin.client_list()
            blocked = [c for c in clients if c.get("cmd") == "xread" and "b" in c.get("flags", "") and c["db"] == db]
            if len(blocked) >= count:
                return
            assert time.monotonic() < deadline, f"{len(blocked)} of {count} readers blocked"
            await asyncio.sleep(0.05)
    finally:
        await admin.aclose()


async def _contract(
    tmp_path: Path, url: str
) -> tuple[list[LifecycleEvent], list[LifecycleEvent], list[tuple[str, LifecycleEvent]], list[Any]]:
    """(produced, what the follower applied, what the watcher yielded, the raw stream entries)."""
    store = Store(tmp_path / "db.sqlite")
    produced = _produce(store)
    gateway = RecordingRoutes()
    stop = asyncio.Event()
    follower = asyncio.create_task(follow_events(gateway, url, stop, block_ms=200))
    watched: list[tuple[str, LifecycleEvent]] = []
    wanted = sum(1 for e in produced if e.tenant == "t")

    async def watch() -> None:
        async for item in events.watch(url, "t"):
            watched.append(item)
            if len(watched) == wanted:
                return

    watcher = asyncio.create_task(watch())
    publisher = events.Publisher(store, url)
    try:
        await _until_blocked_readers(url, 2)
        assert await publisher.drain() == len(produced)
        await asyncio.wait_for(watcher, 10)
        deadline = time.monotonic() + 10
        while len(gateway.applied) < len(produced):
            assert time.monotonic() < deadline, "the gateway's follower did not see every event"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(follower, 5)
        watcher.cancel()
        await publisher.stop()
        store.close()
    assert gateway.cleared == 0  # Redis never dropped: no reason to forget routes
    raw = redis.Redis.from_url(url, decode_responses=True)
    try:
        entries = raw.xrange(STREAM)
    finally:
        raw.close()
    return produced, gateway.applied, watched, entries


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_every_consumer_reads_exactly_what_the_producer_writes(tmp_path: Path, events_redis_url: str) -> None:
    produced, gateway_applied, watched, entries = _run(_contract(tmp_path, events_redis_url))
    assert len(produced) == 9 and {e.tenant for e in produced} == {"t", "u"}
    # On the wire: exactly the record's fields, in the producer's order.
    assert [fields for _, fields in entries] == [e.fields() for e in produced]
    # The gateway's follower: every event, identical, in order.
    assert gateway_applied == produced
    # WatchInstances' reader: the tenant's events, identical, with their stream ids.
    assert [event for _, event in watched] == [e for e in produced if e.tenant == "t"]
    assert [entry_id for entry_id, _ in watched] == [i for i, f in entries if f["tenant"] == "t"]
