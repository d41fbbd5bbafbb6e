"""The session's redis-server is real: it stores and returns data over its wire protocol."""

import redis


def test_redis_round_trip(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.xadd("t:stream", {"k": "v"})
    assert client.xlen("t:stream") == 1
    assert client.info("server")["redis_version"]
    client.close()
