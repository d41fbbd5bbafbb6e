"""The meter (billing_svc/meter.py) in-process against a real redis-server: redeliveries, pending
entries of a crashed consumer, malformed entries, a lost consumer group. Nothing counts twice."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from billing_svc.ledger import Ledger
from billing_svc.meter import GROUP, Meter
from cyberdesk_common.lifecycle_events import STREAM
from tests.billing_svc.events import lifecycles


@pytest.fixture
def stream_url(redis_url: str) -> Iterator[str]:
    """The session's Redis, a database of its own (emptied), so no other test's events are in it."""
    url = redis_url.rsplit("/", 1)[0] + "/11"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def _publish(url: str, fields: list[dict[str, str]]) -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    pipe = client.pipeline(transaction=False)
    for f in fields:
        pipe.xadd(STREAM, f)  # type: ignore[arg-type]
    ids: list[str] = pipe.execute()
    client.close()
    return ids


async def _run_until(meter: Meter, done: object, within: float = 30.0) -> None:
    task = asyncio.create_task(meter.run())
    try:
        deadline = asyncio.get_running_loop().time() + within
        while not done():  # type: ignore[operator]
            assert not task.done(), task
            assert asyncio.get_running_loop().time() < deadline, "the meter did not get there in time"
            await asyncio.sleep(0.02)
    finally:
        meter.request_stop()
        await asyncio.wait_for(task, 10)


def _pending(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        count: int = client.xpending(STREAM, GROUP)["pending"]
        return count
    finally:
        client.close()


def test_duplicated_entries_count_once_and_all_are_acknowledged(stream_url: str, tmp_path: Path) -> None:
    events, expected = lifecycles(40, tenants=4)
    fields = [e.fields() for e in events]
    _publish(stream_url, fields + fields[::3])  # a third of them published twice (at least once)
    ledger = Ledger(tmp_path / "l.db")
    meter = Meter(ledger, stream_url, "c1", batch=50, block_ms=200)
    asyncio.run(_run_until(meter, lambda: ledger.event_count() == len(events) and _pending(stream_url) == 0))
    assert meter.applied == len(events)
    for tenant, seconds in expected.running.items():
        total = ledger.usage(tenant, 0, 2**62, 2**62).total
        assert (total.instance_seconds, total.paused_seconds, total.vcpu_seconds) == (
            seconds,
            expected.paused[tenant],
            expected.vcpu[tenant],
        )


def test_pending_entries_of_a_crashed_consumer_and_of_itself_are_applied(stream_url: str, tmp_path: Path) -> None:
    events, expected = lifecycles(30, tenants=3)
    _publish(stream_url, [e.fields() for e in events])
    raw = redis.Redis.from_url(stream_url, decode_responses=True)
    raw.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    # Two consumers read entries and die before acknowledging: "dead" (another replica) and "me"
    # (this host's billing_svc before its restart).
    raw.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=70)
    raw.xreadgroup(GROUP, "me", {STREAM: ">"}, count=70)
    assert raw.xpending(STREAM, GROUP)["pending"] == 140
    raw.close()
    ledger = Ledger(tmp_path / "l.db")
    meter = Meter(ledger, stream_url, "me", batch=25, block_ms=200, claim_idle_ms=0)
    asyncio.run(_run_until(meter, lambda: ledger.event_count() == len(events) and _pending(stream_url) == 0))
    assert sum(ledger.usage(t, 0, 2**62, 2**62).total.instance_seconds for t in expected.running) == sum(
        expected.running.values()
    )


def test_a_malformed_entry_is_acknowledged_and_skipped(stream_url: str, tmp_path: Path) -> None:
    events, _ = lifecycles(2, tenants=1)
    _publish(stream_url, [events[0].fields(), {"event_id": "x", "new_state": "MELTED"}, events[1].fields()])
    ledger = Ledger(tmp_path / "l.db")
    meter = Meter(ledger, stream_url, "c1", block_ms=200)
    asyncio.run(_run_until(meter, lambda: ledger.event_count() == 2 and _pending(stream_url) == 0))


def test_a_lost_consumer_group_is_made_again_without_double_counting(stream_url: str, tmp_path: Path) -> None:
    events, expected = lifecycles(20, tenants=2)
    half = len(events) // 2
    _publish(stream_url, [e.fields() for e in events[:half]])
    ledger = Ledger(tmp_path / "l.db")
    meter = Meter(ledger, stream_url, "c1", block_ms=200)

    async def scenario() -> None:
        task = asyncio.create_task(meter.run())
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while ledger.event_count() < half:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
            # Redis loses the group (a restart without its data would lose the stream too; here the
            # stream stays, so every entry is read again from 0).
            raw = redis.Redis.from_url(stream_url)
            raw.xgroup_destroy(STREAM, GROUP)
            raw.close()
            _publish(stream_url, [e.fields() for e in events[half:]])
            deadline = asyncio.get_running_loop().time() + 30
            while ledger.event_count() < len(events) or _pending(stream_url):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
        finally:
            meter.request_stop()
            await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    assert meter.applied == len(events)  # the re-read half was recognised, not counted again
    for tenant, seconds in expected.running.items():
        assert ledger.usage(tenant, 0, 2**62, 2**62).total.instance_seconds == seconds
