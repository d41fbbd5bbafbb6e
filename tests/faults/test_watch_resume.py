"""WatchInstances resumes: a watcher cut off by a Redis restart sees every change exactly once, in order.

Real processes only: a persistent redis-server that is killed with SIGKILL and started again on
the same port and data, instance_svc with real sandboxes, the gateway, and the SDK's watch
(which reconnects by itself and resumes from its last cursor). The ground truth is the event
stream itself, read from Redis: every entry of the tenant must reach the watcher once, in
stream order.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import httpx
import pytest
import redis

from cyberdesk import Cyberdesk, CyberdeskError
from cyberdesk._watch import InstanceEvent
from cyberdesk_common.lifecycle_events import STREAM
from tests.faults.stack import Stack

TENANT = "t-watch"

pytestmark = pytest.mark.timeout(180)


def _stream(url: str, tenant: str) -> list[tuple[str, str, str]]:
    """(stream id, instance, new state) of the tenant's entries, straight from Redis."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        entries = client.xrange(STREAM)
    finally:
        client.close()
    return [(sid, f["instance_id"], f["new_state"]) for sid, f in entries if f["tenant"] == tenant]


def _states(stack: Stack) -> set[tuple[str, str]]:
    return {(i, s) for _, i, s in _stream(stack.redis.url, TENANT)}


def _wait(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_watcher_cut_off_by_a_redis_restart_sees_every_change_once_in_order(stack: Stack, key: str) -> None:
    client = Cyberdesk(api_key=key, endpoint=stack.gateway.addr)
    seen: list[InstanceEvent] = []
    failure: list[BaseException] = []
    watch = client.instances.watch()  # returns once the watch is in place
    start = watch.cursor

    def collect() -> None:
        try:
            for event in watch:
                seen.append(event)
        except BaseException as err:  # reported by the test, not lost in the thread
            failure.append(err)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        first = client.instances.create(timeout=120)
        _wait("the watcher to see the first instance run", lambda: any(e.state == "RUNNING" for e in seen))

        stack.redis.kill9()
        # Changes while the event store is down wait in instance_svc's outbox.
        client.instances.delete(first.id)
        second = client.instances.create(timeout=120)
        time.sleep(4)  # the watcher's reconnects fail meanwhile, so its back-off grows
        stack.redis.start()
        # Changes right after the restart, while the watcher is most likely still backing off:
        # the case where a watch "from now" lost most of the transitions.
        third = client.instances.create(timeout=120)
        client.instances.delete(second.id)
        client.instances.delete(third.id)

        def published() -> bool:
            states = {(i, s) for _, i, s in _stream(stack.redis.url, TENANT)}
            return {(second.id, "TERMINATED"), (third.id, "TERMINATED")} <= states

        _wait("every change to reach the stream", published)
        expected = [e for e in _stream(stack.redis.url, TENANT) if e[0] > start]
        _wait("the watcher to catch up", lambda: len(seen) >= len(expected) or failure)
        assert not failure, failure
        got = [(e.cursor, e.instance.id, e.state) for e in seen]
        assert got == expected  # each entry once, in stream order, nothing else
        assert {i for _, i, _ in expected} == {first.id, second.id, third.id}
        assert watch.reconnects >= 1, "the Redis restart never cut the watch: the test proved nothing"
    finally:
        watch.close()
        reader.join(10)
        client.close()


def test_a_cursor_resumes_through_rest_and_one_past_retention_is_out_of_range(stack: Stack, key: str) -> None:
    client = Cyberdesk(api_key=key, endpoint=stack.gateway.addr)
    http = f"http://{stack.gateway.http}"
    auth = {"authorization": f"Bearer {key}"}
    try:
        with client.instances.watch() as watch:
            start = watch.cursor
            box = client.instances.create(timeout=120)
            box.delete()
        # delete() returns once TERMINATED is recorded; the publisher sends it a moment later.
        _wait("the deletion to reach the stream", lambda: (box.id, "TERMINATED") in _states(stack))
        mine = [e for e in _stream(stack.redis.url, TENANT) if e[0] > start and e[1] == box.id]

        # REST: ?cursor= replays every change after it (the query parameter is the request field).
        lines: list[str] = []
        with httpx.stream("GET", f"{http}/v1/instances:watch", params={"cursor": start}, headers=auth, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if box.id in line:
                    lines.append(line)
                if len(lines) == len(mine):
                    break
        assert [f'"{sid}"' in line for (sid, _, _), line in zip(mine, lines, strict=True)] == [True] * len(mine)

        # Trim the stream past that cursor, as the publisher's MAXLEN does once retention is reached.
        r = redis.Redis.from_url(stack.redis.url)
        try:
            r.xtrim(STREAM, minid=mine[-1][0], approximate=False)
        finally:
            r.close()
        with pytest.raises(CyberdeskError) as caught:
            client.instances.watch(cursor=start)
        assert caught.value.code is grpc.StatusCode.OUT_OF_RANGE
        assert "retention" in str(caught.value)
        rest = httpx.get(f"{http}/v1/instances:watch", params={"cursor": start}, headers=auth, timeout=30)
        assert rest.status_code == 400 and "retention" in rest.text

        # A cursor this API never handed out is a caller error, not a silent replay from zero.
        with pytest.raises(CyberdeskError) as bad:
            client.instances.watch(cursor="yesterday")
        assert bad.value.code is grpc.StatusCode.INVALID_ARGUMENT
        # The last cursor still held resumes (nothing after it was trimmed).
        with client.instances.watch(cursor=mine[-1][0]) as resumed:
            assert resumed.cursor == mine[-1][0]
    finally:
        client.close()


def test_the_async_watch_delivers_the_same_changes_in_order(stack: Stack, key: str) -> None:
    from cyberdesk import AsyncCyberdesk

    async def scenario() -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
        async with AsyncCyberdesk(api_key=key, endpoint=stack.gateway.addr) as client:
            watch = await client.instances.watch()
            start = watch.cursor
            box = await client.instances.create(timeout=120)
            await box.pause()
            await box.resume()
            await box.delete()
            seen: list[tuple[str, str, str]] = []
            async with watch:
                async for event in watch:
                    if event.instance.id == box.id:
                        seen.append((event.cursor, event.instance.id, event.state))
                    if event.instance.id == box.id and event.state == "TERMINATED":
                        break
        stream = [e for e in _stream(stack.redis.url, TENANT) if e[0] > start and e[1] == box.id]
        return seen, stream

    seen, stream = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert seen == stream
    assert [s for _, _, s in seen][-4:] == ["PAUSED", "RUNNING", "STOPPING", "TERMINATED"]
