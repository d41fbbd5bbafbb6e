"""The rate limiter against a real redis-server: GCRA decisions, pipelining, script reload, outages."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import redis

from gateway_svc.ratelimit import EARLY_MARGIN, Limit, RateLimiter, RedisUnavailable, _command, _Incomplete, _parse
from tests.support.procs import free_port


def _fresh_key(name: str) -> str:
    # The redis-server is shared by the session: a unique key per test keeps budgets apart.
    return f"{name}-{free_port()}"


def test_limit_is_enforced_then_refills(redis_url: str) -> None:
    async def scenario() -> None:
        limiter = RateLimiter(redis_url)
        key = _fresh_key("refill")
        try:
            decisions = [await limiter.check(key, Limit(3, 0.3)) for _ in range(4)]
            assert [d.allowed for d in decisions] == [True, True, True, False]
            assert decisions[0].remaining == 2
            assert 0 < decisions[3].retry_after <= 0.1 + 1e-3
            await asyncio.sleep(decisions[3].retry_after + 0.02)
            assert (await limiter.check(key, Limit(3, 0.3))).allowed
        finally:
            await limiter.close()

    asyncio.run(scenario())


def test_concurrent_checks_share_one_connection_and_never_overspend(redis_url: str) -> None:
    async def scenario() -> None:
        limiter = RateLimiter(redis_url)
        key = _fresh_key("burst")
        connects = 0
        connect = limiter._redis._connect

        async def counting_connect() -> Any:
            nonlocal connects
            connects += 1
            return await connect()

        limiter._redis._connect = counting_connect  # type: ignore[method-assign]
        try:
            decisions = await asyncio.gather(*(limiter.check(key, Limit(10, 3600)) for _ in range(50)))
            assert connects == 1  # the 50 first calls waited for one connection attempt
            assert sum(d.allowed for d in decisions) == 10
            assert sorted(d.remaining for d in decisions if d.allowed) == list(range(10))
            assert all(d.retry_after > 0 for d in decisions if not d.allowed)
        finally:
            await limiter.close()

    asyncio.run(scenario())


def test_begun_check_is_decided_after_other_work(redis_url: str) -> None:
    async def scenario() -> None:
        limiter = RateLimiter(redis_url)
        key = _fresh_key("begin")
        try:
            await limiter.check(key, Limit(1, 3600))  # connects, spends the only request
            pending = limiter.begin(key, Limit(1, 3600))
            assert pending.future is not None  # already written to Redis
            await asyncio.sleep(0.01)
            decision = await limiter.finish(pending)
            assert not decision.allowed and decision.retry_after > 3000
        finally:
            await limiter.close()

    asyncio.run(scenario())


def test_ample_budget_allows_without_waiting_and_redis_still_counts_every_call(redis_url: str) -> None:
    async def scenario() -> None:
        limiter = RateLimiter(redis_url)
        key = _fresh_key("early")
        limit = Limit(100, 3600)
        admin = redis.Redis.from_url(redis_url)
        try:
            # Nothing known about the key yet (the first also opens the connection): both wait for Redis.
            for left in (99, 98):
                pending = limiter.begin(key, limit)
                assert not pending.early
                assert (await limiter.finish(pending)).remaining == left
            # 98 left, none in flight: the next ones may go without waiting, at most EARLY_MARGIN
            # unconfirmed at a time, and never while fewer than EARLY_MARGIN would be left.
            burst = [limiter.begin(key, limit) for _ in range(3 * EARLY_MARGIN)]
            assert sum(p.early for p in burst) == EARLY_MARGIN
            assert all(p.early for p in burst[:EARLY_MARGIN])
            assert all([(await limiter.finish(p)).allowed for p in burst])
            # Drain to the limit one by one: the calls near it wait for Redis, which refuses the 101st.
            decisions = [await limiter.check(key, limit) for _ in range(100 - 2 - 3 * EARLY_MARGIN)]
            assert all(d.allowed for d in decisions)
            pending = limiter.begin(key, limit)
            assert not pending.early
            assert not (await limiter.finish(pending)).allowed
            # Every call was spent in Redis, the early ones included (the TAT moved 101 intervals
            # minus the refused one; about 100 * 36 s ahead).
            tat_us = int(admin.get(f"cyberdesk:rl:{key}") or 0)
            now_s, now_us = admin.time()
            assert (tat_us - (now_s * 1_000_000 + now_us)) / 36e6 == pytest.approx(100, abs=0.1)
        finally:
            admin.close()
            await limiter.close()

    asyncio.run(scenario())


def test_small_limits_always_wait_for_redis(redis_url: str) -> None:
    async def scenario() -> None:
        limiter = RateLimiter(redis_url)
        key = _fresh_key("small")
        try:
            for _ in range(EARLY_MARGIN + 1):
                pending = limiter.begin(key, Limit(EARLY_MARGIN + 1, 3600))
                assert not pending.early
                assert (await limiter.finish(pending)).allowed
            assert not (await limiter.check(key, Limit(EARLY_MARGIN + 1, 3600))).allowed
        finally:
            await limiter.close()

    asyncio.run(scenario())


def test_flushed_script_is_loaded_again(redis_url: str) -> None:
    async def scenario() -> None:
        limiter = RateLimiter(redis_url)
        key = _fresh_key("noscript")
        try:
            assert (await limiter.check(key, Limit(2, 3600))).allowed
            redis.Redis.from_url(redis_url).script_flush()
            second = await limiter.check(key, Limit(2, 3600))  # NOSCRIPT, then EVAL
            assert second.allowed and second.remaining == 0
            assert not (await limiter.check(key, Limit(2, 3600))).allowed  # EVALSHA works again
        finally:
            await limiter.close()

    asyncio.run(scenario())


def test_unreachable_redis_fails_open_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        limiter = RateLimiter(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
        try:
            decisions = [await limiter.check("k", Limit(1, 3600)) for _ in range(3)]
            assert all(d.allowed and d.remaining == -1 for d in decisions)
        finally:
            await limiter.close()

    with caplog.at_level(logging.WARNING, logger="gateway_svc.ratelimit"):
        asyncio.run(scenario())
    warnings = [r for r in caplog.records if "failing open" in r.getMessage()]
    assert len(warnings) == 1


def test_killed_connection_is_reopened_by_the_next_check(redis_url: str) -> None:
    async def scenario() -> None:
        limiter = RateLimiter(redis_url)
        key = _fresh_key("killed")
        admin = redis.Redis.from_url(redis_url)
        try:
            assert (await limiter.check(key, Limit(1, 3600))).allowed
            pipe = limiter._redis._pipe
            assert pipe is not None and pipe._transport is not None
            host, port = pipe._transport.get_extra_info("sockname")[:2]
            admin.client_kill(f"{host}:{port}")  # drops the limiter's connection
            await asyncio.sleep(0.05)
            again = await limiter.check(key, Limit(1, 3600))
            assert not again.allowed and again.remaining == 0  # reconnected: the spent budget is enforced
            assert limiter._redis._pipe is not pipe
        finally:
            admin.close()
            await limiter.close()

    asyncio.run(scenario())


def test_database_and_password_from_the_url(redis_url: str) -> None:
    async def scenario() -> None:
        url = redis_url.rsplit("/", 1)[0] + "/3"
        limiter = RateLimiter(url, prefix="t:")
        key = _fresh_key("db3")
        try:
            await limiter.check(key, Limit(5, 3600))
        finally:
            await limiter.close()
        assert redis.Redis.from_url(url).exists(f"t:{key}") == 1
        assert redis.Redis.from_url(redis_url).exists(f"t:{key}") == 0
        # A wrong password is an error reply at connect: the limiter fails open, it does not crash.
        bad = RateLimiter("redis://:wrong@" + redis_url.rsplit("@", 1)[1])
        try:
            assert (await bad.check(key, Limit(5, 3600))).remaining == -1
        finally:
            await bad.close()

    asyncio.run(scenario())


def test_reply_parser_waits_for_whole_replies() -> None:
    reply = b"*3\r\n:1\r\n:0\r\n:42\r\n$3\r\nabc\r\n$-1\r\n-NOSCRIPT No matching script\r\n+OK\r\n"
    values = []
    pos = 0
    while pos < len(reply):
        value, pos = _parse(bytearray(reply), pos)
        values.append(value)
    assert values[:4] == [[1, 0, 42], b"abc", None, values[3]]
    assert isinstance(values[3], RedisUnavailable) and str(values[3]).startswith("NOSCRIPT")
    assert values[4] == b"OK"
    for cut in range(1, 17):  # every prefix of the first reply is incomplete, never misread
        with pytest.raises(_Incomplete):
            _parse(bytearray(reply[:cut]), 0)
    assert _command("GET", "k", 7) == b"*3\r\n$3\r\nGET\r\n$1\r\nk\r\n$1\r\n7\r\n"
