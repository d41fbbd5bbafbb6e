"""The gateway's follower of lifecycle events (gateway_svc/routing.follow_events) across a Redis outage.

A private redis-server is stopped and started again on the same port (empty, as a Redis without
persistence comes back): the follower forgets every route while it cannot read, reconnects with
back-off, and resumes after the last id it saw, so the event written after the restart arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import redis

from cyberdesk_common.lifecycle_events import STREAM, InstanceState, LifecycleEvent
from cyberdesk_stack.processes import redis_server
from gateway_svc.routing import follow_events
from tests.common.event_recorder import RecordingRoutes
from tests.support.procs import free_port


def _event(n: int) -> LifecycleEvent:
    return LifecycleEvent(
        event_id=f"e-{n}",
        tenant="t",
        instance_id=f"i-{n}",
        old_state=InstanceState.RUNNING,
        new_state=InstanceState.TERMINATED,
        time_us=1_700_000_000_000_000 + n,
        vcpus=1,
        memory_mib=512,
        template="base",
        state_message="deleted",
    )


async def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10.0
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def _blocked_readers(url: str) -> int:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return sum(1 for c in client.client_list() if c.get("cmd") == "xread" and "b" in c.get("flags", ""))
    finally:
        client.close()


def _publish(url: str, event: LifecycleEvent) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.xadd(STREAM, event.fields())  # type: ignore[arg-type]
    finally:
        client.close()


def test_follower_reconnects_after_an_outage_and_misses_nothing(tmp_path: Path) -> None:
    port = free_port()
    routes = RecordingRoutes()
    for data in ("r1", "r2"):
        (tmp_path / data).mkdir()

    async def scenario() -> None:
        with ExitStack() as first_redis:
            url = first_redis.enter_context(redis_server(tmp_path / "r1", port=port))
            stop = asyncio.Event()
            follower = asyncio.create_task(follow_events(routes, url, stop, block_ms=200, max_backoff=0.5))
            await _until(lambda: _blocked_readers(url) == 1, "the follower never blocked in XREAD")
            _publish(url, _event(1))
            await _until(lambda: len(routes.applied) == 1, "event 1 not applied")
            assert routes.cleared == 0
        # Redis is gone: every route is forgotten (events may be missed) and the follower retries.
        await _until(lambda: routes.cleared >= 1, "routes not forgotten during the outage")
        assert not follower.done()
        with ExitStack() as second_redis:
            # The same Redis coming back: same port, same password (the follower keeps its URL).
            password = urlsplit(url).password
            url = second_redis.enter_context(redis_server(tmp_path / "r2", port=port, password=password))
            _publish(url, _event(2))  # possibly before the follower is back: it must still arrive
            await _until(lambda: len(routes.applied) == 2, "event 2 (after the restart) not applied")
            stop.set()
            await asyncio.wait_for(follower, 5)

    asyncio.run(scenario())
    assert routes.applied == [_event(1), _event(2)]
    assert routes.cleared >= 2  # once when Redis went away, once more when it came back
