"""Delivery of the outbox (outbox.py) to Stripe Billing Meters, through the real `stripe` library.

Runs only when a Stripe secret key is configured (CYBERDESK_STRIPE_SECRET_KEY); without one
nothing leaves the machine: rows stay in the outbox as the record of what would be reported.

Per pass over the due rows:

1. Rows too old to send are settled as `expired` / `unconfirmed` (outbox.age_out).
2. Each tenant's Stripe customer is looked up, or created once (`POST /v1/customers` with the
   idempotency key `cyberdesk-customer:<tenant>`, so a create retried after a crash before the
   mapping was stored returns the same customer for Stripe's 24 h) and stored.
3. Events go out on the v2 meter event stream in batches of up to 100, several batches in
   flight. Its session token (valid 15 minutes) is renewed ahead of expiry and at once on a 401;
   the batch is then sent again.
4. The v1 endpoint is the fallback, one event per call with the identifier as its idempotency
   key, calls for one (customer, meter) one after another (Stripe allows one concurrent call
   each): for a batch the stream refused as a whole (HTTP 400, so the offending event is found),
   and for FALLBACK_SECONDS after the stream or its session is unavailable (404, 403).
5. Settling: the stream's `{}` or a v1 event is `delivered`; v1's "An event already exists with
   identifier" is `duplicate`, which counts as delivered (an earlier attempt was stored). Other
   4xx of v1 are `rejected` (logged with Stripe's message). 429, 5xx and lost connections are
   retried: per row, backoff 0.5 s x 2^attempts capped at CYBERDESK_STRIPE_BACKOFF_CAP_SECONDS
   (default 60), half of it random (jitter); a 429 also pauses every send for that long.

The library's own retries are off (max_network_retries=0): ours are durable and survive a
restart, the library's would not, and its default timeout of 80 s is replaced by
CYBERDESK_STRIPE_TIMEOUT_SECONDS (10).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import stripe
from stripe._api_requestor import _maybe_emit_stripe_notice
from stripe._request_options import merge_options

from billing_svc import outbox
from billing_svc.outbox import OutboxRow
from billing_svc.stripe_windows import WindowCloser
from cyberdesk_common.config import ConfigError, env_float, env_int, env_str

_log = logging.getLogger("billing_svc.stripe")
T = TypeVar("T")

DEFAULT_API_BASE = "https://api.stripe.com"
DEFAULT_METER_EVENTS_BASE = "https://meter-events.stripe.com"
MAX_BATCH = 100  # events per v2 stream request (Stripe's limit)
STREAM_PATH = "/v2/billing/meter_event_stream"
FALLBACK_SECONDS = 300.0
BACKOFF_BASE = 0.5
DUPLICATE_MESSAGE = "An event already exists with identifier"


@dataclass(frozen=True)
class StripeSettings:
    """Where and how usage is reported; `from_env()` returns None when no key is configured."""

    secret_key: str
    api_base: str = DEFAULT_API_BASE
    meter_events_base: str = DEFAULT_METER_EVENTS_BASE
    stream: str = "v2"  # "v2": the meter event stream, v1 as fallback; "v1": v1 only
    # 32 stream batches in flight: the bench measured 3,954 to 4,725 meter events/s with 16 and 5,042
    # with 32 on this (loaded, 2-core) machine; Stripe's stream takes 10,000 requests/s.
    concurrency: int = 32
    timeout: float = 10.0
    backoff_cap: float = 60.0
    poll_interval: float = 0.2

    @classmethod
    def from_env(cls) -> StripeSettings | None:
        """CYBERDESK_STRIPE_SECRET_KEY and the settings beside it (docs/billing.md, "Stripe")."""
        key = env_str("STRIPE_SECRET_KEY", "")
        if not key:
            return None
        api_base = env_str("STRIPE_API_BASE", DEFAULT_API_BASE).rstrip("/")
        # A test or a proxy that replaces the API usually replaces both hosts.
        meter_default = api_base if api_base != DEFAULT_API_BASE else DEFAULT_METER_EVENTS_BASE
        stream = env_str("STRIPE_STREAM", "v2")
        if stream not in ("v1", "v2"):
            raise ConfigError(f"CYBERDESK_STRIPE_STREAM={stream!r}: use v2 (stream, v1 fallback) or v1")
        return cls(
            secret_key=key,
            api_base=api_base,
            meter_events_base=env_str("STRIPE_METER_EVENTS_BASE", meter_default).rstrip("/"),
            stream=stream,
            concurrency=env_int("STRIPE_CONCURRENCY", 32, minimum=1),
            timeout=env_float("STRIPE_TIMEOUT_SECONDS", 10.0),
            backoff_cap=env_float("STRIPE_BACKOFF_CAP_SECONDS", 60.0),
            poll_interval=env_float("STRIPE_POLL_SECONDS", 0.2),
        )


def rfc3339(unix: int) -> str:
    """The v2 timestamp form (UTC, 'Z'); v1 takes the integer itself (a naive datetime would be local time)."""
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def backoff(attempts: int, cap: float, rng: random.Random) -> float:
    """Seconds to wait after the `attempts`-th failure: 0.5 s x 2^(n-1), capped, the upper half random."""
    ceiling = min(cap, BACKOFF_BASE * 2.0 ** max(0, attempts - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class _Outcome:
    """How one send ended, for the rows it carried."""

    def __init__(self, kind: str, error: str = "", uncertain: bool = False, pause: bool = False) -> None:
        self.kind, self.error, self.uncertain, self.pause = kind, error, uncertain, pause


def classify(err: Exception) -> _Outcome:
    """A failed call's outcome: retry (uncertain or not), duplicate, rejected, or session/fallback."""
    if isinstance(err, stripe.TemporarySessionExpiredError | stripe.AuthenticationError):
        return _Outcome("session", str(err.user_message or err))
    if isinstance(err, stripe.RateLimitError):
        return _Outcome("retry", "429 rate limited", pause=True)
    if isinstance(err, stripe.APIConnectionError):
        # The request may have reached Stripe and been stored before the connection was lost.
        return _Outcome("retry", "connection lost", uncertain=True)
    if isinstance(err, stripe.InvalidRequestError):
        message = str(err.user_message or "")
        if err.http_status == 400 and message.startswith(DUPLICATE_MESSAGE):
            return _Outcome("duplicate")
        if err.http_status == 404:
            return _Outcome("fallback", message)
        return _Outcome("rejected", message)
    if isinstance(err, stripe.PermissionError):
        return _Outcome("fallback", str(err.user_message or err))
    if isinstance(err, stripe.IdempotencyError):
        return _Outcome("rejected", str(err.user_message or err))
    if isinstance(err, stripe.StripeError):
        status = err.http_status or 0
        # A 5xx may have been stored (Stripe says so with Stripe-Should-Retry); assume it may.
        return _Outcome("retry", f"HTTP {status}", uncertain=status >= 500 or status == 0)
    return _Outcome("retry", type(err).__name__, uncertain=True)


class StripeDelivery:
    """The outbox deliverer: `await start()`, then it runs until `await close()`."""

    def __init__(
        self,
        settings: StripeSettings,
        db_path: Path,
        *,
        closer: WindowCloser | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.db_path = db_path
        self.closer = closer  # None: rows are queued by someone else (tests of delivery alone)
        self.clock = clock
        self.rng = rng or random.Random()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stripe-outbox")
        self._conn: sqlite3.Connection | None = None
        self._http = stripe.HTTPXClient(timeout=settings.timeout)
        self.client = stripe.StripeClient(
            settings.secret_key,
            base_addresses={"api": settings.api_base, "meter_events": settings.meter_events_base},
            http_client=self._http,
            max_network_retries=0,
        )
        self._customers: dict[str, str] = {}  # tenant -> Stripe customer, as stored in stripe_customers
        self._token = ""
        self._token_renew_at = 0.0
        self._session_lock = asyncio.Lock()
        self._v1_until = 0.0  # the stream is not used before this (fallback after 404/403)
        self._paused_until = 0.0  # a 429 pauses every send until then
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._delivered: list[str] = []  # answered by the stream, not yet committed as delivered
        self._settling: asyncio.Task[None] | None = None
        self.sent_batches = 0
        logging.getLogger("stripe").setLevel(logging.WARNING)  # its INFO lines are one per request

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database connection and run the delivery loop in a task."""
        await self._db(self._open)
        self._task = asyncio.create_task(self._run(), name="stripe-delivery")
        _log.info(
            "stripe delivery started",
            extra={"api": self.settings.api_base, "stream": self.settings.stream},
        )

    async def close(self) -> None:
        """Stop after the send in flight (bounded by the timeout); pending rows stay queued."""
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, self.settings.timeout + 5)
        await self._db(self._close_db)
        self._executor.shutdown(wait=True)

    def wake(self) -> None:
        """Look at the outbox now (the ledger calls it after queueing rows)."""
        self._wake.set()

    def _open(self) -> None:
        conn = sqlite3.connect(self.db_path, timeout=30.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        # NORMAL, not FULL: in WAL a commit of this connection can be lost to a power cut, never
        # to a crash, and either loss is safe: a lost "delivered" mark resends an identifier
        # Stripe already has (counted once), a lost window close reopens the window (same values,
        # same identifiers). One fsync per settled batch would cap delivery far below the stream.
        conn.execute("PRAGMA synchronous=NORMAL")
        outbox.ensure_schema(conn)
        if self.closer is not None:
            self.closer.ensure_schema(conn)
        self._conn = conn

    def _close_db(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # One thread owns the connection: SQLite calls (and their busy waits on the ledger's
        # writer) never block the event loop that serves gRPC.
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "StripeDelivery.start() was not called"
        return self._conn

    # -- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                started = time.monotonic()
                queued = 0
                if self.closer is not None:
                    queued = await self._db(self.closer.close_due, self.conn, int(self.clock()))
                closed = time.monotonic()
                sent = await self.flush()
                if queued or sent:
                    _log.debug(
                        "stripe pass",
                        extra={
                            "queued": queued,
                            "sent": sent,
                            "close_ms": round((closed - started) * 1000),
                            "flush_ms": round((time.monotonic() - closed) * 1000),
                        },
                    )
            except Exception:  # a bug or a database error: log it, keep the loop alive
                _log.exception("stripe delivery pass failed")
                sent = 0
            if sent:
                continue  # more may be due at once
            wait = self.settings.poll_interval
            next_at = await self._db(outbox.next_due, self.conn)
            if next_at is not None:
                wait = min(wait, max(0.0, next_at - self.clock()))
            wait = max(wait, self._paused_until - self.clock())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.01, wait))

    async def flush(self) -> int:
        """One pass over the rows due now; returns how many rows were settled or rescheduled."""
        now = self.clock()
        if now < self._paused_until:
            return 0
        limit = MAX_BATCH * self.settings.concurrency * 4
        rows = await self._db(outbox.due, self.conn, now, limit)
        if not rows:
            return 0
        live: list[OutboxRow] = []
        aged: dict[str, list[str]] = defaultdict(list)
        for row in rows:
            verdict = outbox.age_out(row, int(now))
            if verdict is None:
                live.append(row)
            else:
                aged[verdict].append(row.identifier)
        for state, identifiers in aged.items():
            _log.error(
                "meter events can no longer be sent to Stripe",
                extra={"state": state, "count": len(identifiers), "first": identifiers[0]},
            )
            await self._db(outbox.settle, self.conn, identifiers, state, int(now), state)
        by_tenant: dict[str, list[OutboxRow]] = defaultdict(list)
        for row in live:
            by_tenant[row.tenant].append(row)
        customers: dict[str, str] = {}
        for tenant, tenant_rows in by_tenant.items():
            try:
                customers[tenant] = await self._customer(tenant)
            except stripe.StripeError as err:
                outcome = classify(err)
                _log.warning("stripe customer not available", extra={"tenant": tenant, "error": outcome.error})
                await self._reschedule(tenant_rows, outcome, count_attempt=False)
        sendable = [row for row in live if row.tenant in customers]
        await self._send(sendable, customers)
        return len(rows)

    # -- customers -------------------------------------------------------------------------------

    async def _customer(self, tenant: str) -> str:
        known = self._customers.get(tenant)
        if known is not None:
            return known  # a mapping never changes once stored
        found = await self._db(outbox.customer_of, self.conn, tenant)
        if found is not None:
            self._customers[tenant] = found
            return found
        created = await self.client.v1.customers.create_async(
            {"name": tenant, "metadata": {"cyberdesk_tenant": tenant}},
            options={"idempotency_key": f"cyberdesk-customer:{tenant}"},
        )
        stored = await self._db(outbox.remember_customer, self.conn, tenant, created.id, int(self.clock()))
        _log.info("stripe customer mapped", extra={"tenant": tenant, "customer": stored})
        self._customers[tenant] = stored
        return stored

    # -- sending ---------------------------------------------------------------------------------

    async def _send(self, rows: Sequence[OutboxRow], customers: dict[str, str]) -> None:
        if not rows:
            return
        use_stream = self.settings.stream == "v2" and self.clock() >= self._v1_until
        gate = asyncio.Semaphore(self.settings.concurrency)
        if use_stream:
            batches = [rows[i : i + MAX_BATCH] for i in range(0, len(rows), MAX_BATCH)]

            async def one(batch: Sequence[OutboxRow]) -> None:
                async with gate:
                    if self.clock() < self._paused_until:
                        return  # a 429 met by another batch of this pass: these stay due, sent after the pause
                    await self._stream_batch(batch, customers)

            try:
                await asyncio.gather(*(one(b) for b in batches))
            finally:
                await self._settled()
            return
        # v1: one call at a time per (customer, meter), as Stripe asks.
        lanes: dict[tuple[str, str], list[OutboxRow]] = defaultdict(list)
        for row in rows:
            lanes[(row.tenant, row.event_name)].append(row)

        async def lane(lane_rows: list[OutboxRow]) -> None:
            async with gate:
                for row in lane_rows:
                    await self._v1_event(row, customers[row.tenant])

        await asyncio.gather(*(lane(r) for r in lanes.values()))

    async def _stream_batch(self, batch: Sequence[OutboxRow], customers: dict[str, str]) -> None:
        stamps: dict[int, str] = {}  # rows of a batch mostly share a few window ends
        events = [
            {
                "event_name": row.event_name,
                "identifier": row.identifier,
                "timestamp": stamps.get(row.timestamp) or stamps.setdefault(row.timestamp, rfc3339(row.timestamp)),
                "payload": {"stripe_customer_id": customers[row.tenant], "value": str(row.value)},
            }
            for row in batch
        ]
        body = json.dumps({"events": events})  # once, however often the batch is sent
        for renewed in (False, True):
            try:
                token = await self._session(force=renewed)
            except stripe.StripeError as err:
                # No event was sent: whatever the session call met, the rows are not uncertain.
                outcome = classify(err)
                if outcome.kind in ("fallback", "session"):
                    self._v1_until = self.clock() + FALLBACK_SECONDS
                    _log.warning("meter event sessions unavailable, v1 for a while", extra={"error": outcome.error})
                await self._reschedule(batch, _Outcome("retry", outcome.error, pause=outcome.pause))
                return
            try:
                await self._post_stream(body, token)
            except stripe.StripeError as err:
                outcome = classify(err)
                if outcome.kind == "session" and not renewed:
                    continue  # expired under us: a new session, the same batch again
                if outcome.kind in ("rejected", "duplicate"):
                    # Refused as a whole (the stream validates events asynchronously, so this is
                    # the request itself): v1 finds which event is wrong and sends the others.
                    _log.warning("stream batch refused, sending it by v1", extra={"error": outcome.error})
                    for row in batch:
                        await self._v1_event(row, customers[row.tenant])
                    return
                if outcome.kind in ("fallback", "session"):
                    self._v1_until = self.clock() + FALLBACK_SECONDS
                    _log.warning("meter event stream unavailable, v1 for a while", extra={"error": outcome.error})
                    outcome = _Outcome("retry", outcome.error)
                await self._reschedule(batch, outcome)
                return
            except Exception as err:  # the HTTP layer below the library: the outcome is unknown
                await self._reschedule(batch, _Outcome("retry", type(err).__name__, uncertain=True))
                return
            self.sent_batches += 1
            self._settle_delivered([r.identifier for r in batch])
            return

    def _settle_delivered(self, identifiers: list[str]) -> None:
        """Mark a delivered batch's rows, grouped with the batches answered while a commit runs.

        One transaction (and one hop to the database thread) for whatever was answered meanwhile,
        instead of one per batch. `_send` waits for it before the pass ends, so the next pass never
        reads these rows as pending; a crash before the commit sends them again, which Stripe counts
        once (the identifier), exactly as a crash between the answer and a per-batch commit would.
        """
        self._delivered.extend(identifiers)
        if self._settling is None or self._settling.done():
            self._settling = asyncio.create_task(self._settle_loop(), name="stripe-settle")

    async def _settle_loop(self) -> None:
        while self._delivered:
            identifiers, self._delivered = self._delivered, []
            await self._db(outbox.settle, self.conn, identifiers, outbox.DELIVERED, int(self.clock()))

    async def _settled(self) -> None:
        """Wait until every delivered batch so far is committed as delivered."""
        task, self._settling = self._settling, None
        if task is not None:
            await task  # a database error of the group commit surfaces in the pass (logged there)

    async def _post_stream(self, body: str, token: str) -> None:
        """POST one JSON batch to the meter event stream, through the library's own request machinery.

        `client.v2.billing.meter_event_stream.create_async` would send these same bytes, but on
        the way it form-encodes every body (`_APIRequestor._args_for_request_with_retries` runs
        urlencode over all 100 events for its debug log line, then sends json.dumps of them): ~6 ms
        of CPU per batch, the largest single cost of delivery. This does what that method does
        after the encoding, with the library's parts: its headers (`request_headers`: user agent,
        Authorization, a fresh Idempotency-Key, Content-Type application/json), its HTTP client
        (timeout, telemetry; max_network_retries 0 as for every call here) and its response
        handling (`_interpret_response`: the same StripeError subclasses, so `classify` holds).
        Private API of stripe 16.1.0, which is pinned; tests/billing_svc/stripe/test_wire.py checks
        the request is byte for byte the one create_async sends.
        """
        requestor = self.client._requestor
        options = merge_options(requestor._options, {"api_key": token})
        headers = requestor.request_headers("post", "V2", options)
        url = f"{requestor._options.base_addresses.get('meter_events')}{STREAM_PATH}"
        rbody, rcode, rheaders = await requestor._get_http_client().request_with_retries_async(
            "post", url, headers, body, max_network_retries=0, _usage=["stripe_client", "async"]
        )
        _maybe_emit_stripe_notice(rheaders)
        requestor._interpret_response(rbody, rcode, rheaders, "V2")

    async def _session(self, force: bool) -> str:
        async with self._session_lock:
            if force or not self._token or self.clock() >= self._token_renew_at:
                session = await self.client.v2.billing.meter_event_session.create_async()
                created = _parse_time(str(session.created))
                expires = _parse_time(str(session.expires_at))
                ttl = max(1.0, expires - created)
                # Renewed ahead of expiry by a fifth of its life (at most a minute), measured on
                # our clock from now, so a clock skew with Stripe does not matter.
                self._token_renew_at = self.clock() + ttl - min(60.0, ttl / 5)
                self._token = str(session.authentication_token)
            return self._token

    async def _v1_event(self, row: OutboxRow, customer: str) -> None:
        try:
            await self.client.v1.billing.meter_events.create_async(
                {
                    "event_name": row.event_name,
                    "identifier": row.identifier,
                    "timestamp": row.timestamp,
                    "payload": {"stripe_customer_id": customer, "value": str(row.value)},
                },
                options={"idempotency_key": f"cyberdesk-mev:{row.identifier}"},
            )
        except stripe.StripeError as err:
            outcome = classify(err)
            if outcome.kind == "duplicate":
                await self._db(outbox.settle, self.conn, [row.identifier], outbox.DUPLICATE, int(self.clock()))
            elif outcome.kind == "rejected":
                _log.error(
                    "stripe rejected a meter event",
                    extra={"identifier": row.identifier, "error": outcome.error},
                )
                await self._db(
                    outbox.settle, self.conn, [row.identifier], outbox.REJECTED, int(self.clock()), outcome.error
                )
            else:
                await self._reschedule([row], outcome)
            return
        except Exception as err:
            await self._reschedule([row], _Outcome("retry", type(err).__name__, uncertain=True))
            return
        await self._db(outbox.settle, self.conn, [row.identifier], outbox.DELIVERED, int(self.clock()))

    async def _reschedule(self, rows: Sequence[OutboxRow], outcome: _Outcome, *, count_attempt: bool = True) -> None:
        now = self.clock()
        attempts = max((r.attempts for r in rows), default=0) + 1
        delay = backoff(attempts, self.settings.backoff_cap, self.rng)
        if outcome.pause:
            self._paused_until = max(self._paused_until, now + delay)
        _log.warning(
            "stripe send failed, retrying",
            extra={"error": outcome.error, "rows": len(rows), "attempt": attempts, "retry_in_s": round(delay, 2)},
        )
        await self._db(
            outbox.retry_later,
            self.conn,
            [r.identifier for r in rows],
            now + delay,
            outcome.error,
            uncertain=outcome.uncertain,
            now=int(now),
            count_attempt=count_attempt,
        )


def _parse_time(value: str) -> float:
    """An RFC 3339 time of the v2 API (or unix seconds) as unix seconds."""
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
