"""The lifecycle event: the one contract between instance_svc (producer) and every consumer.

instance_svc announces each state change of an instance as one entry of the Redis stream
`STREAM` (its outbox publisher, `instance_svc/events.py`, writes them at least once). Consumers
today: `WatchInstances` (instance_svc) and the gateway's route cache (`gateway_svc/routing.py`);
billing meters from the same entries later. All of them use what is defined here and nothing
else:

- `InstanceState`: the states, valued as the `cyberdesk.v1.InstanceState` numbers and named as
  that enum without its `INSTANCE_STATE_` prefix (the name is what goes on the wire).
- `LifecycleEvent`: the typed record; `fields()` / `from_fields()` are the stream entry's
  encoding (flat string fields, documented in docs/instance_svc.md).
- `tail()`: the one correct reader. It reads the stream's last id once and then XREADs from the
  last id it has seen. Re-sending `$` on every XREAD would silently drop every entry written
  between two reads (while the consumer handles an entry, or between an empty read and the
  next); asking from an id cannot.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from cyberdesk_proto.v1 import instance_pb2

STREAM = "cyberdesk:events"

# A blocked XREAD must return before the socket timeout, or redis-py turns an idle stream into a
# TimeoutError; both numbers live here so a reader cannot be configured into that trap.
SOCKET_TIMEOUT_SECONDS = 10.0
BLOCK_MS = 2_000

_log = logging.getLogger("cyberdesk.lifecycle_events")


class InstanceState(enum.Enum):
    """Lifecycle states; values are the `cyberdesk.v1.InstanceState` numbers."""

    PENDING = instance_pb2.INSTANCE_STATE_PENDING
    STARTING = instance_pb2.INSTANCE_STATE_STARTING
    RUNNING = instance_pb2.INSTANCE_STATE_RUNNING
    PAUSED = instance_pb2.INSTANCE_STATE_PAUSED
    STOPPING = instance_pb2.INSTANCE_STATE_STOPPING
    TERMINATED = instance_pb2.INSTANCE_STATE_TERMINATED
    FAILED = instance_pb2.INSTANCE_STATE_FAILED

    @property
    def terminal(self) -> bool:
        """TERMINATED and FAILED hold no resources and never change again."""
        return self in (InstanceState.TERMINATED, InstanceState.FAILED)


class MalformedEvent(ValueError):
    """A stream entry that is not a lifecycle event as `LifecycleEvent.fields()` writes it."""


class EventStreamUnavailable(ConnectionError):
    """Redis (the event stream) cannot be reached; the message says where and why."""


@dataclass(frozen=True)
class LifecycleEvent:
    """One state change of an instance, as published on `STREAM` (see docs/instance_svc.md)."""

    event_id: str  # UUID of the change: delivery is at least once, consumers de-duplicate on it
    tenant: str
    instance_id: str
    old_state: InstanceState | None  # None for the PENDING that creates the instance
    new_state: InstanceState
    time_us: int  # when, microseconds since the epoch
    vcpus: int
    memory_mib: int
    template: str
    state_message: str

    def fields(self) -> dict[str, str]:
        """The flat string fields of the stream entry."""
        return {
            "event_id": self.event_id,
            "tenant": self.tenant,
            "instance_id": self.instance_id,
            "old_state": self.old_state.name if self.old_state else "",
            "new_state": self.new_state.name,
            "time_us": str(self.time_us),
            "vcpus": str(self.vcpus),
            "memory_mib": str(self.memory_mib),
            "template": self.template,
            "state_message": self.state_message,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, str] | Mapping[bytes, bytes]) -> LifecycleEvent:
        """Parse a stream entry written by `fields` (keys and values as str or as bytes).

        Raises MalformedEvent naming what is missing or wrong; never guesses at another shape.
        """
        decoded = {_text(k): _text(v) for k, v in fields.items()}
        try:
            old = decoded.get("old_state", "")
            return cls(
                event_id=decoded["event_id"],
                tenant=decoded["tenant"],
                instance_id=decoded["instance_id"],
                old_state=InstanceState[old] if old else None,
                new_state=InstanceState[decoded["new_state"]],
                time_us=int(decoded["time_us"]),
                vcpus=int(decoded["vcpus"]),
                memory_mib=int(decoded["memory_mib"]),
                template=decoded["template"],
                state_message=decoded.get("state_message", ""),
            )
        except KeyError as err:
            raise MalformedEvent(f"not a lifecycle event: no field or state {err}") from None
        except ValueError as err:
            raise MalformedEvent(f"not a lifecycle event: {err}") from None


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def connect(redis_url: str) -> aioredis.Redis:
    """A Redis client for `tail`: its socket timeout is longer than a blocked XREAD."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        redis_url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT_SECONDS, socket_connect_timeout=2.0
    )
    return client


def _where(client: aioredis.Redis) -> str:
    # Host and port only: the URL may carry a password.
    kwargs = client.connection_pool.connection_kwargs
    return f"redis at {kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


async def tail(
    client: aioredis.Redis, *, after: str | None = None, block_ms: int = BLOCK_MS, count: int = 100
) -> AsyncGenerator[tuple[str, LifecycleEvent], None]:
    """Yield (stream id, event) for every entry after `after`, forever.

    `after=None` means "from now": the stream's last id, read once before the first XREAD. A
    consumer that resumes (after an outage) passes the last id it has seen and misses nothing
    that is still in the stream. A malformed entry is logged and skipped. Raises
    EventStreamUnavailable when Redis cannot be reached; the caller decides whether to retry.
    """
    timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    if timeout is not None and block_ms / 1000 >= timeout:
        raise ValueError(f"XREAD BLOCK {block_ms} ms would outlast the socket timeout of {timeout} s")
    try:
        if after is None:
            newest: Any = await client.xrevrange(STREAM, count=1)
            after = _text(newest[0][0]) if newest else "0-0"
        last = after
        while True:
            reply: Any = await client.xread({STREAM: last}, block=block_ms, count=count)
            for _stream, entries in reply or ():
                for raw_id, fields in entries:
                    last = _text(raw_id)
                    try:
                        event = LifecycleEvent.from_fields(fields)
                    except MalformedEvent as err:
                        _log.warning("skipping a stream entry", extra={"entry_id": last, "error": str(err)})
                        continue
                    yield last, event
    except (RedisError, OSError) as err:
        raise EventStreamUnavailable(f"the event stream ({_where(client)}) is unreachable: {err}") from err
