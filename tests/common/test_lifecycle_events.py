"""The shared tail reader of the lifecycle event stream (cyberdesk_common/lifecycle_events.py), on a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from cyberdesk_common import lifecycle_events
from cyberdesk_common.lifecycle_events import (
    STREAM,
    EventStreamUnavailable,
    InstanceState,
    LifecycleEvent,
    MalformedEvent,
    tail,
)
from tests.support.procs import free_port

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _event(n: int, new_state: InstanceState = InstanceState.RUNNING) -> LifecycleEvent:
    return LifecycleEvent(
        event_id=f"e-{n}",
        tenant="t",
        instance_id=f"i-{n}",
        old_state=InstanceState.STARTING,
        new_state=new_state,
        time_us=1_700_000_000_000_000 + n,
        vcpus=1,
        memory_mib=512,
        template="base",
        state_message="",
    )


class WritesBetweenReads(aioredis.Redis):
    """A real client that XADDs `between` after its first XREAD returns and before the next is sent."""

    between: LifecycleEvent | None = None
    reads = 0

    async def xread(self, *args: Any, **kwargs: Any) -> Any:
        reply = await super().xread(*args, **kwargs)
        self.reads += 1
        if self.reads == 1 and self.between is not None:
            await self.xadd(STREAM, self.between.fields())  # type: ignore[arg-type]
        return reply


def test_fields_round_trip_and_nothing_else_parses() -> None:
    for event in (_event(1), _event(2, InstanceState.TERMINATED)):
        assert LifecycleEvent.from_fields(event.fields()) == event
    created = LifecycleEvent(**{**_event(3).__dict__, "old_state": None, "new_state": InstanceState.PENDING})
    assert created.fields()["old_state"] == "" and LifecycleEvent.from_fields(created.fields()) == created
    for bad in ({"instance_id": "i-1", "state": "PAUSED"}, {**_event(4).fields(), "new_state": "6"}, {}):
        with pytest.raises(MalformedEvent):
            LifecycleEvent.from_fields(bad)


def test_an_event_written_between_two_reads_is_not_dropped(events_redis_url: str) -> None:
    async def scenario() -> list[tuple[str, LifecycleEvent]]:
        client = WritesBetweenReads.from_url(events_redis_url, decode_responses=True, socket_timeout=10.0)
        client.between = _event(1)
        try:
            # The first XREAD (100 ms) finds nothing; the event is written before the second one.
            reader = tail(client, block_ms=100)
            first = await asyncio.wait_for(anext(reader), 5.0)
            # ... and one written while the consumer holds the first event (between reads again).
            await client.xadd(STREAM, _event(2).fields())  # type: ignore[arg-type]
            second = await asyncio.wait_for(anext(reader), 5.0)
            await reader.aclose()
            assert client.reads >= 2
            return [first, second]
        finally:
            await client.aclose()

    got = _run(scenario())
    assert [event for _, event in got] == [_event(1), _event(2)]


def test_from_now_skips_older_entries_and_resuming_after_an_id_misses_nothing(events_redis_url: str) -> None:
    async def scenario() -> tuple[LifecycleEvent, LifecycleEvent]:
        client = lifecycle_events.connect(events_redis_url)
        try:
            old_id = await client.xadd(STREAM, _event(1).fields())  # type: ignore[arg-type]
            reader = tail(client, block_ms=100)
            pending = asyncio.ensure_future(anext(reader))
            await asyncio.sleep(0.3)  # the reader has read the stream's end (after event 1)
            await client.xadd(STREAM, _event(2).fields())  # type: ignore[arg-type]
            _, from_now = await asyncio.wait_for(pending, 5.0)
            await reader.aclose()
            resumed = tail(client, after=old_id, block_ms=100)
            _, after = await asyncio.wait_for(anext(resumed), 5.0)
            await resumed.aclose()
            return from_now, after
        finally:
            await client.aclose()

    from_now, after = _run(scenario())
    assert from_now == _event(2)
    assert after == _event(2)


def test_a_malformed_entry_is_skipped(events_redis_url: str) -> None:
    async def scenario() -> LifecycleEvent:
        client = lifecycle_events.connect(events_redis_url)
        try:
            await client.xadd(STREAM, {"instance_id": "i-1", "state": "PAUSED"})
            await client.xadd(STREAM, _event(2).fields())  # type: ignore[arg-type]
            reader = tail(client, after="0-0", block_ms=100)
            _, event = await asyncio.wait_for(anext(reader), 5.0)
            await reader.aclose()
            return event
        finally:
            await client.aclose()

    assert _run(scenario()) == _event(2)


def test_unreachable_redis_is_a_clear_error() -> None:
    port = free_port()  # nothing listens there

    async def scenario() -> None:
        client = lifecycle_events.connect(f"redis://127.0.0.1:{port}/0")
        try:
            await anext(tail(client))
        finally:
            await client.aclose()

    with pytest.raises(EventStreamUnavailable, match=rf"event stream \(redis at 127\.0\.0\.1:{port}\) is unreachable"):
        _run(scenario())


def test_a_block_longer_than_the_socket_timeout_is_refused() -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=1.0)
        try:
            await anext(tail(client, block_ms=2_000))
        finally:
            await client.aclose()

    with pytest.raises(ValueError, match="outlast the socket timeout"):
        _run(scenario())


# -- cursors (pure) ---------------------------------------------------------------------------


def test_a_cursor_is_a_stream_id_and_nothing_else() -> None:
    assert lifecycle_events.parse_cursor("1700000000000-3") == (1700000000000, 3)
    for bad in ("", "$", "-", "0", "12-", "-3", "a-1", "1-2-3", " 1-2", "1-" + "9" * 21):
        with pytest.raises(lifecycle_events.BadCursor):
            lifecycle_events.parse_cursor(bad)


def test_stream_bounds_refuse_only_a_cursor_whose_followers_may_be_trimmed() -> None:
    untrimmed = lifecycle_events.StreamBounds(last_generated=(50, 0), first_entry=(10, 0), trimmed=False)
    assert untrimmed.problem((0, 0)) is None and untrimmed.problem((20, 0)) is None
    trimmed = lifecycle_events.StreamBounds(last_generated=(50, 0), first_entry=(30, 0), trimmed=True)
    assert trimmed.problem((30, 0)) is None and trimmed.problem((40, 1)) is None
    assert "retention" in (trimmed.problem((29, 5)) or "")
    assert "retention" in (trimmed.problem((0, 0)) or "")
    emptied = lifecycle_events.StreamBounds(last_generated=(50, 0), first_entry=None, trimmed=True)
    assert emptied.problem((50, 0)) is None and "retention" in (emptied.problem((49, 0)) or "")
    # A cursor ahead of everything the stream generated is from a stream that was reset.
    assert "reset" in (trimmed.problem((51, 0)) or "")
