"""The lifecycle event: the one contract between instance_svc (producer) and every consumer.

instance_svc announces each state change of an instance as one entry of the Redis stream
`STREAM` (its outbox publisher, `instance_svc/events.py`, writes them at least once). Consumers
today: `WatchInstances` (instance_svc), the gateway's route cache (`gateway_svc/routing.py`) and
billing_svc's meter (`billing_svc/meter.py`, a consumer group). All of them use what is defined
here and nothing else:

- `InstanceState`: the states, valued as the `cyberdesk.v1.InstanceState` numbers and named as
  that enum without its `INSTANCE_STATE_` prefix (the name is what goes on the wire).
- `LifecycleEvent`: the typed record; `fields()` / `from_fields()` are the stream entry's
  encoding (flat string fields, documented in docs/instance_svc.md).
- `tail()`: the one correct reader. It reads the stream's last id once and then XREADs from the
  last id it has seen. Re-sending `$` on every XREAD would silently drop every entry written
  between two reads (while the consumer handles an entry, or between an empty read and the
  next); asking from an id cannot.
- Cursors: a stream id ("<ms>-<seq>") is where a reader resumes. `parse_cursor` reads one,
  `StreamBounds.problem` says (purely) whether the stream still holds everything after it, and
  `bounds()` reads those bounds from Redis (XINFO STREAM).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from cyberdesk_proto.v1 import instance_pb2

STREAM = "cyberdesk:events"
# Retention: the publisher trims the stream to about this many entries (XADD MAXLEN ~, which
# trims whole stream nodes, so slightly more stay). Watch cursors older than that are refused
# with OUT_OF_RANGE. At a few hundred changes a minute this is days of history.
RETENTION_EVENTS = 1_000_000

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
    # What billing meters besides vCPUs and memory: the instance's disk and whether it has a
    # desktop. Entries written before these fields existed read as 0 and False.
    disk_mib: int = 0
    desktop: bool = False

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
            "disk_mib": str(self.disk_mib),
            "desktop": "1" if self.desktop else "0",
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
                disk_mib=int(decoded.get("disk_mib", "0") or "0"),
                desktop=decoded.get("desktop", "0") == "1",
            )
        except KeyError as err:
            raise MalformedEvent(f"not a lifecycle event: no field or state {err}") from None
        except ValueError as err:
            raise MalformedEvent(f"not a lifecycle event: {err}") from None


class BadCursor(ValueError):
    """A cursor that is not a stream id as this stream hands them out ("<ms>-<seq>")."""


def parse_cursor(text: str) -> tuple[int, int]:
    """The (milliseconds, sequence) of a stream id "<ms>-<seq>"; BadCursor for anything else.

    Strict on purpose: Redis would also accept "<ms>", "-" or "$" in XREAD, but a cursor is only
    ever one of our own ids, and a lenient parse would turn a typo into a silent replay from zero.
    """
    ms, sep, seq = text.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit() or len(ms) > 20 or len(seq) > 20:
        raise BadCursor(f"{text[:60]!r} is not a watch cursor (the `cursor` of a response, like '1700000000000-0')")
    parsed = (int(ms), int(seq))
    if parsed[0] >= 2**64 or parsed[1] >= 2**64:
        raise BadCursor(f"{text[:60]!r} is not a watch cursor (out of range)")
    return parsed


@dataclass(frozen=True)
class StreamBounds:
    """What the stream still holds: the last id it generated, its first entry, whether any entry went.

    Trimming (MAXLEN, MINID) removes entries from the head only, so after a trim the stream holds
    exactly the entries from `first_entry` on. A cursor before the first entry is refused once
    anything was trimmed: the entries between the cursor and the first entry may be gone (Redis
    does not say where the trim cut; the conservative answer costs an old watcher a re-list,
    never a silent gap). `trimmed` comes from `entries-added` against `length` (Redis 7); an
    older Redis does not report it, and then it is assumed.
    """

    last_generated: tuple[int, int]
    first_entry: tuple[int, int] | None
    trimmed: bool

    def problem(self, cursor: tuple[int, int]) -> str | None:
        """Why resuming after `cursor` could miss entries (None when it misses none)."""
        if cursor > self.last_generated:
            return (
                "the cursor is newer than every event the stream holds (the event stream was reset); "
                "read the current state with ListInstances and watch without a cursor"
            )
        if not self.trimmed or cursor == self.last_generated:
            return None
        if self.first_entry is None or cursor < self.first_entry:
            return (
                f"the cursor is older than the event stream's retention (about {RETENTION_EVENTS:,} events): "
                "the changes after it were trimmed; read the current state with ListInstances and "
                "watch without a cursor"
            )
        return None


async def bounds(client: aioredis.Redis) -> StreamBounds:
    """The stream's bounds (XINFO STREAM); an absent stream has generated nothing.

    Raises EventStreamUnavailable when Redis cannot be reached.
    """
    try:
        info: Any = await client.xinfo_stream(STREAM)
    except ResponseError as err:
        if "no such key" not in str(err).lower():
            raise EventStreamUnavailable(f"the event stream ({_where(client)}) cannot be read: {err}") from err
        return StreamBounds((0, 0), None, trimmed=False)
    except (RedisError, OSError) as err:
        raise EventStreamUnavailable(f"the event stream ({_where(client)}) is unreachable: {err}") from err
    first = info.get("first-entry")
    added = info.get("entries-added")
    return StreamBounds(
        last_generated=parse_cursor(_text(info["last-generated-id"])),
        first_entry=parse_cursor(_text(first[0])) if first else None,
        trimmed=added is None or int(added) > int(info.get("length", 0)),
    )


async def last_id(client: aioredis.Redis) -> str:
    """The id of the stream's newest entry ("0-0" when it is empty): where "from now" starts."""
    try:
        newest: Any = await client.xrevrange(STREAM, count=1)
    except (RedisError, OSError) as err:
        raise EventStreamUnavailable(f"the event stream ({_where(client)}) is unreachable: {err}") from err
    return _text(newest[0][0]) if newest else "0-0"


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
