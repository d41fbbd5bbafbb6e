"""Per-key rate limits, enforced atomically in Redis.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket written as one timestamp):
a key may make `limit` requests per `window`, as a burst or spread out. Redis holds one value per
key, the "theoretical arrival time" (TAT); one Lua script reads, decides and writes it, so two
gateway replicas can never both spend the last request. The script takes the time from Redis
(`TIME`), not from the gateways, so replicas with skewed clocks agree.

When Redis cannot be reached the limiter fails OPEN: the call goes through and one warning per
`_OUTAGE_LOG_SECONDS` is logged. A rate limit protects capacity, it is not an authorisation
check (API keys and tenant checks do not depend on Redis), and refusing every call of every
tenant because a cache node restarts would turn a small outage into a total one.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

_log = logging.getLogger("gateway_svc.ratelimit")

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_LIMIT_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_OUTAGE_LOG_SECONDS = 10.0
# After a failed Redis call the limiter skips Redis for this long, so a dead Redis costs one
# connect timeout per second rather than one per call.
_OUTAGE_BACKOFF_SECONDS = 1.0

# KEYS[1]: the key's TAT; ARGV[1]: emission interval (µs) = window / limit; ARGV[2]: window (µs).
# Returns {allowed (0/1), retry_after_us, remaining}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - window
if now < allow_at then
  return {0, allow_at - now, 0}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0, math.floor((now - allow_at) / interval)}
"""


@dataclass(frozen=True)
class Limit:
    """At most `limit` requests per `window_seconds`."""

    limit: int
    window_seconds: float

    def __str__(self) -> str:
        return f"{self.limit}/{self.window_seconds:g}s"


def parse_limit(text: str) -> Limit:
    """Parse "100/1s", "6000/1m", "10/500ms" (the count, a slash, an optional number and a unit)."""
    match = _LIMIT_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a rate limit; write it as <requests>/<window>, e.g. 100/1s or 6000/1m")
    count, amount, unit = int(match[1]), float(match[2] or 1), match[3]
    window = amount * _UNITS[unit]
    if count <= 0 or window <= 0:
        raise ValueError(f"{text!r}: both the request count and the window must be positive")
    return Limit(count, window)


@dataclass(frozen=True)
class Decision:
    """The outcome of one rate-limit check."""

    allowed: bool
    retry_after: float  # seconds until the next request would be allowed (0 when allowed)
    remaining: int  # requests left in the current burst (-1 when unknown: Redis down)


class RateLimiter:
    """Checks and spends one request of a key's budget (see the module docstring for the rules)."""

    def __init__(self, redis_url: str, prefix: str = "cyberdesk:rl:") -> None:
        self._redis = aioredis.Redis.from_url(
            redis_url, socket_timeout=0.25, socket_connect_timeout=0.25, health_check_interval=0
        )
        self._script = self._redis.register_script(_GCRA)
        self._prefix = prefix
        self._down_until = 0.0
        self._last_log = 0.0

    async def check(self, key_id: str, limit: Limit) -> Decision:
        """Spend one request of `key_id`'s budget under `limit`; fail open when Redis is unreachable."""
        now = time.monotonic()
        if now < self._down_until:
            return Decision(True, 0.0, -1)
        window_us = int(limit.window_seconds * 1_000_000)
        interval_us = max(1, window_us // limit.limit)
        try:
            allowed, retry_us, remaining = await self._script(
                keys=[self._prefix + key_id], args=[interval_us, window_us]
            )
        except (RedisError, OSError) as err:
            self._down_until = now + _OUTAGE_BACKOFF_SECONDS
            if now - self._last_log > _OUTAGE_LOG_SECONDS:
                self._last_log = now
                _log.warning("rate limits not enforced: redis unreachable (failing open)", extra={"error": str(err)})
            return Decision(True, 0.0, -1)
        return Decision(bool(allowed), int(retry_us) / 1_000_000, int(remaining))

    async def close(self) -> None:
        """Close the Redis connections."""
        await self._redis.aclose()
