"""The meter: lifecycle events from the Redis stream into the ledger, through a consumer group.

Delivery rules (docs/billing.md, "The consumer"):
- Entries are acknowledged (XACK) only after the ledger transaction holding them committed. A
  crash in between leaves them pending; they are delivered again and the ledger skips every
  event id it already holds, so nothing is lost and nothing counts twice.
- At start the consumer first re-reads its own pending entries (`XREADGROUP ... 0`), then new
  ones (`>`). Entries another consumer left pending longer than `claim_idle_ms` are taken over
  with XAUTOCLAIM (a replica that died).
- A malformed entry, or one trimmed while pending, is acknowledged: it can never be applied, and
  leaving it pending would replay it forever.
- Redis unreachable: retry with back-off; the group lost with Redis's data (NOGROUP) is made again
  from the stream's start, which only re-reads events the ledger already skips.
- Stopping is a request (`request_stop`), seen between reads (at most one BLOCK later), not a
  task cancel: a cancel that lands while redis-py's blocking XREADGROUP times out was seen to be
  swallowed (the read's own timeout wins and the loop reads on), which hung the shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from billing_svc.ledger import Ledger
from cyberdesk_common import lifecycle_events
from cyberdesk_common.lifecycle_events import STREAM, LifecycleEvent, MalformedEvent

GROUP = "billing"
_log = logging.getLogger("billing_svc.meter")


def default_consumer() -> str:
    """A consumer name stable across restarts of this host's billing_svc (so it finds its own pending entries)."""
    return f"billing-{socket.gethostname()}"


def _now_us() -> int:
    return time.time_ns() // 1000


class Meter:
    """Reads the lifecycle stream as consumer `consumer` of group `billing` and applies it to `ledger`."""

    def __init__(
        self,
        ledger: Ledger,
        redis_url: str,
        consumer: str | None = None,
        *,
        batch: int = 500,
        block_ms: int = lifecycle_events.BLOCK_MS,
        claim_idle_ms: int = 30_000,
        claim_every_s: float = 10.0,
        now_us: Callable[[], int] = _now_us,
    ) -> None:
        self.ledger = ledger
        self.redis_url = redis_url
        self.consumer = consumer or default_consumer()
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.claim_every_s = claim_every_s
        self._now_us = now_us
        self.applied = 0  # new events applied by this process
        self.connected = asyncio.Event()
        self._progress = asyncio.Condition()
        self._stop = False

    def request_stop(self) -> None:
        """Ask `run` to return after the read in progress (a batch read is still applied and acknowledged)."""
        self._stop = True

    async def run(self) -> None:
        """Consume until `request_stop`; reconnects with back-off when Redis goes away."""
        self._stop = False
        delay = 0.1
        down = False
        while not self._stop:
            client = lifecycle_events.connect(self.redis_url)
            try:
                await self._ensure_group(client)
                self.connected.set()
                if down:
                    _log.info("the event stream is reachable again")
                down, delay = False, 0.1
                await self._consume(client)
            except (RedisError, OSError) as err:
                self.connected.clear()
                if not down:
                    _log.warning("the event stream is unreachable; metering waits", extra={"error": str(err)})
                down = True
                for _ in range(int(delay / 0.1)):  # in steps, so a stop request is seen soon
                    if self._stop:
                        break
                    await asyncio.sleep(0.1)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()

    async def _ensure_group(self, client: aioredis.Redis) -> None:
        try:
            await client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
            _log.info("consumer group made", extra={"group": GROUP, "stream": STREAM})
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def _consume(self, client: aioredis.Redis) -> None:
        # Our own pending entries first: a batch read before a crash, not yet acknowledged.
        while not self._stop:
            reply: Any = await client.xreadgroup(GROUP, self.consumer, {STREAM: "0"}, count=self.batch)
            entries = _entries(reply)
            if not entries:
                break
            await self._handle(client, entries)
        last_claim = 0.0
        while not self._stop:
            if time.monotonic() - last_claim >= self.claim_every_s:
                await self._claim(client)
                last_claim = time.monotonic()
            try:
                reply = await client.xreadgroup(
                    GROUP, self.consumer, {STREAM: ">"}, count=self.batch, block=self.block_ms
                )
            except ResponseError as err:
                if "NOGROUP" not in str(err):
                    raise
                _log.warning("the consumer group is gone (Redis lost its data?); making it again")
                await self._ensure_group(client)
                continue
            entries = _entries(reply)
            if entries:
                await self._handle(client, entries)

    async def _claim(self, client: aioredis.Redis) -> None:
        start = "0-0"
        while True:
            reply: Any = await client.xautoclaim(
                STREAM, GROUP, self.consumer, self.claim_idle_ms, start_id=start, count=self.batch
            )
            start = reply[0]
            claimed = [(i, f) for i, f in reply[1] if i is not None]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                await client.xack(STREAM, GROUP, *deleted)
            if claimed:
                _log.info("took over pending entries", extra={"count": len(claimed)})
                await self._handle(client, claimed)
            if start == "0-0":
                return

    async def _handle(self, client: aioredis.Redis, entries: Sequence[tuple[str, Any]]) -> None:
        good: list[tuple[str, LifecycleEvent]] = []
        ids: list[str] = []
        for entry_id, fields in entries:
            ids.append(entry_id)
            if not fields:
                continue  # trimmed while pending: nothing to apply
            try:
                good.append((entry_id, LifecycleEvent.from_fields(fields)))
            except MalformedEvent as err:
                _log.warning("acknowledging a malformed entry", extra={"entry_id": entry_id, "error": str(err)})
        new = self.ledger.apply(good, self._now_us())  # committed before the XACK below
        self.applied += new
        await client.xack(STREAM, GROUP, *ids)
        async with self._progress:
            self._progress.notify_all()

    async def wait_applied(self, event_id: str, within: float) -> bool:
        """Wait until `event_id` is in the ledger (tests and benches of an in-process meter)."""
        deadline = asyncio.get_running_loop().time() + within
        async with self._progress:
            while not self.ledger.applied(event_id):
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), remaining)
        return True


def _entries(reply: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for _stream, items in reply or ():
        out.extend(items)
    return out
