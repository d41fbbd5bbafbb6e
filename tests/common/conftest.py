"""Fixtures of the shared-package tests: a private Redis database for the event stream."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis


@pytest.fixture
def events_redis_url(redis_url: str) -> Iterator[str]:
    """A database of the session's real redis-server that only this test writes (emptied before and after).

    The stream name is fixed (`cyberdesk:events`), so a database of its own keeps other tests'
    events out of the stream these tests read.
    """
    url = redis_url.rsplit("/", 1)[0] + "/5"
    admin = redis.Redis.from_url(url)
    admin.flushdb()
    try:
        yield url
    finally:
        admin.flushdb()
        admin.close()
