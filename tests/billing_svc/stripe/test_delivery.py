"""The outbox deliverer against the Stripe stand-in, through the real `stripe` library.

The deliverer runs in this process on a real SQLite file; the stand-in is a real HTTP server on
loopback (billing_svc/stripe_standin.py). Rows are queued with `outbox.enqueue`, as the window
closer does. Every test ends with the same check: the stand-in accepted each queued identifier
once, with its value, nothing else, and no identifier with two different payloads.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import stripe

from billing_svc import outbox
from billing_svc.outbox import MeterEvent
from billing_svc.stripe_delivery import StripeDelivery, StripeSettings
from billing_svc.stripe_standin import Fault, StripeStandin

KEY = "sk_test_delivery"
DAY = 86_400


@pytest.fixture
def standin() -> Iterator[StripeStandin]:
    s = StripeStandin(KEY).start()
    yield s
    s.stop()


def _db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    outbox.ensure_schema(conn)
    return conn


def _events(n: int, now: int, tenants: int = 3, prefix: str = "i") -> list[MeterEvent]:
    return [
        MeterEvent(
            identifier=f"cd1:{prefix}-{k % 40}:vcpu_seconds:{now - 3600 + (k // 40) * 60}",
            tenant=f"tenant-{k % tenants}",
            event_name="cyberdesk_vcpu_seconds",
            value=1 + k % 9,
            timestamp=now - 3600 + (k // 40) * 60 + 59,
        )
        for k in range(n)
    ]


def _queue(conn: sqlite3.Connection, events: list[MeterEvent]) -> None:
    with conn:
        outbox.enqueue(conn, events)


def _settings(standin: StripeStandin, **kw: object) -> StripeSettings:
    base: dict[str, object] = {"backoff_cap": 0.4, "poll_interval": 0.05, "timeout": 5.0}
    base.update(kw)
    return StripeSettings(KEY, standin.url, standin.url, **base)  # type: ignore[arg-type]


async def _deliver(delivery: StripeDelivery, conn: sqlite3.Connection) -> dict[str, int]:
    await delivery.start()
    try:
        deadline = time.monotonic() + 30
        while outbox.counts(conn).get(outbox.PENDING, 0):
            assert time.monotonic() < deadline, f"outbox not drained: {outbox.counts(conn)}"
            await asyncio.sleep(0.05)
        return outbox.counts(conn)
    finally:
        await delivery.close()


def _exactly_once(standin: StripeStandin, events: list[MeterEvent], tenants_customers: dict[str, str]) -> None:
    accepted = standin.accepted()
    assert sorted(accepted) == sorted(e.identifier for e in events)
    for e in events:
        got = accepted[e.identifier]
        assert (got.value, got.event_name, got.timestamp) == (e.value, e.event_name, e.timestamp)
        assert got.customer == tenants_customers[e.tenant]
    assert standin.conflicts == []
    assert standin.total() == sum(e.value for e in events)


def _customers(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT tenant, customer_id FROM stripe_customers"))


def test_stream_faults_neither_lose_nor_double(standin: StripeStandin, tmp_path: Path) -> None:
    """500, 429 without retry headers, connections dropped before and after processing: each row once."""
    conn = _db(tmp_path / "ledger.db")
    events = _events(1200, int(time.time()))
    _queue(conn, events)
    standin.inject(
        "v2_stream",
        Fault("status_500"),
        Fault("status_429"),
        Fault("drop_before"),
        Fault("drop_after"),
        Fault("status_500"),
        Fault("drop_after"),
        Fault("delay", seconds=0.3),
    )
    counts = asyncio.run(_deliver(StripeDelivery(_settings(standin), tmp_path / "ledger.db"), conn))
    assert counts == {outbox.DELIVERED: len(events)}
    _exactly_once(standin, events, _customers(conn))
    statuses = Counter(status for _, path, status in standin.requests if path == "/v2/billing/meter_event_stream")
    assert statuses[500] == 2 and statuses[429] == 1 and statuses[0] == 3  # every fault was met
    # The batches dropped after processing were sent again: Stripe saw them twice, counted them once.
    assert sum(n - 1 for n in standin.submissions.values()) == 200
    # One customer per tenant, made once.
    assert len(standin.customers) == 3 and sorted(_customers(conn)) == ["tenant-0", "tenant-1", "tenant-2"]


def test_v1_duplicate_answer_counts_as_delivered(standin: StripeStandin, tmp_path: Path) -> None:
    """On v1, "An event already exists with identifier" settles the row as delivered (not an error, not a retry)."""
    conn = _db(tmp_path / "ledger.db")
    events = _events(120, int(time.time()), tenants=1)
    _queue(conn, events)
    # An earlier process sent the first 30 (its idempotency keys are not ours): Stripe has them.
    client = stripe.StripeClient(
        KEY, base_addresses={"api": standin.url}, http_client=stripe.HTTPXClient(allow_sync_methods=True)
    )
    customer = client.v1.customers.create({"name": "tenant-0"}).id
    with conn:
        conn.execute("INSERT INTO stripe_customers VALUES ('tenant-0', ?, 0)", (customer,))
    for e in events[:30]:
        client.v1.billing.meter_events.create(
            {
                "event_name": e.event_name,
                "identifier": e.identifier,
                "timestamp": e.timestamp,
                "payload": {"stripe_customer_id": customer, "value": str(e.value)},
            }
        )
    standin.inject(
        "v1_meter_events",
        Fault("status_500"),
        Fault("status_429"),
        Fault("drop_before"),
        Fault("drop_after"),
    )
    counts = asyncio.run(_deliver(StripeDelivery(_settings(standin, stream="v1"), tmp_path / "ledger.db"), conn))
    assert counts == {outbox.DUPLICATE: 30, outbox.DELIVERED: 90}
    _exactly_once(standin, events, {"tenant-0": customer})
    duplicates = [s for m, p, s in standin.requests if p == "/v1/billing/meter_events" and s == 400]
    assert len(duplicates) >= 30


def test_session_expiry_mid_stream(tmp_path: Path) -> None:
    """The v2 session token expires (by time and by Stripe ending it) while batches go out: renewed, nothing lost."""
    standin = StripeStandin(KEY, session_ttl=1.0).start()
    try:
        conn = _db(tmp_path / "ledger.db")
        events = _events(1500, int(time.time()))
        _queue(conn, events)
        # Slow batches, one at a time: 15 batches take longer than several session lifetimes.
        standin.inject("v2_stream", *[Fault("delay", seconds=0.15) for _ in range(15)])
        delivery = StripeDelivery(_settings(standin, concurrency=1), tmp_path / "ledger.db")

        async def run() -> dict[str, int]:
            async def end_sessions() -> None:
                await asyncio.sleep(0.4)
                standin.expire_sessions()  # mid-stream, before the token's own expiry

            ender = asyncio.create_task(end_sessions())
            counts = await _deliver(delivery, conn)
            await ender
            return counts

        counts = asyncio.run(run())
        assert counts == {outbox.DELIVERED: len(events)}
        _exactly_once(standin, events, _customers(conn))
        stream = [s for _, p, s in standin.requests if p == "/v2/billing/meter_event_stream"]
        assert 401 in stream  # the ended session was refused and renewed, the batch sent again
        assert len(standin.sessions) >= 3  # renewed ahead of expiry too
    finally:
        standin.stop()


def test_outage_queues_and_drains(tmp_path: Path) -> None:
    """Stripe unreachable: rows wait (attempts counted, nothing settled); once it answers again they all go."""
    standin = StripeStandin(KEY).start()
    url = standin.url
    port = int(url.rsplit(":", 1)[1])
    standin.stop()  # nothing listens there now
    conn = _db(tmp_path / "ledger.db")
    events = _events(300, int(time.time()))
    _queue(conn, events)
    delivery = StripeDelivery(
        StripeSettings(KEY, url, url, backoff_cap=0.3, poll_interval=0.05, timeout=2.0), tmp_path / "ledger.db"
    )
    back: list[StripeStandin] = []

    async def run() -> dict[str, int]:
        await delivery.start()
        try:
            deadline = time.monotonic() + 20
            # Every row has been tried (its tenant's customer could not be made: Stripe is away).
            while conn.execute("SELECT COUNT(*) FROM stripe_outbox WHERE last_error = ''").fetchone()[0]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert outbox.counts(conn) == {outbox.PENDING: len(events)}
            back.append(StripeStandin(KEY, port=port).start())  # Stripe is back, same address
            while outbox.counts(conn).get(outbox.PENDING, 0):
                assert time.monotonic() < deadline, outbox.counts(conn)
                await asyncio.sleep(0.05)
            return outbox.counts(conn)
        finally:
            await delivery.close()

    try:
        assert asyncio.run(run()) == {outbox.DELIVERED: len(events)}
        _exactly_once(back[0], events, _customers(conn))
    finally:
        for s in back:
            s.stop()


def test_rows_past_stripes_windows_are_not_sent(standin: StripeStandin, tmp_path: Path) -> None:
    """A timestamp older than 35 days is `expired`; an uncertain attempt older than 23 h is `unconfirmed`."""
    conn = _db(tmp_path / "ledger.db")
    now = int(time.time())
    fresh = _events(10, now, tenants=1, prefix="fresh")
    old = [MeterEvent("cd1:old:vcpu_seconds:1", "tenant-0", "cyberdesk_vcpu_seconds", 5, now - 36 * DAY)]
    unsure = [MeterEvent("cd1:unsure:vcpu_seconds:1", "tenant-0", "cyberdesk_vcpu_seconds", 7, now - 2 * DAY)]
    _queue(conn, fresh + old + unsure)
    with conn:  # an attempt two days ago whose answer never came
        outbox.retry_later(conn, [unsure[0].identifier], 0, "connection lost", uncertain=True, now=now - 2 * DAY)
    counts = asyncio.run(_deliver(StripeDelivery(_settings(standin), tmp_path / "ledger.db"), conn))
    assert counts == {outbox.DELIVERED: 10, outbox.EXPIRED: 1, outbox.UNCONFIRMED: 1}
    _exactly_once(standin, fresh, _customers(conn))


def test_customer_made_once_when_its_answer_is_lost(standin: StripeStandin, tmp_path: Path) -> None:
    """The customer create's answer is lost after Stripe made it: the retry (same idempotency key) gets the same one."""
    conn = _db(tmp_path / "ledger.db")
    events = _events(50, int(time.time()), tenants=2)
    _queue(conn, events)
    standin.inject("customers", Fault("drop_after"), Fault("status_500"))
    counts = asyncio.run(_deliver(StripeDelivery(_settings(standin), tmp_path / "ledger.db"), conn))
    assert counts == {outbox.DELIVERED: 50}
    assert len(standin.customers) == 2
    _exactly_once(standin, events, _customers(conn))


def test_session_failures_leave_rows_certain(standin: StripeStandin, tmp_path: Path) -> None:
    """A session that cannot be made sends no event: the rows wait without being marked uncertain."""
    conn = _db(tmp_path / "ledger.db")
    events = _events(200, int(time.time()))
    _queue(conn, events)
    standin.inject("v2_session", Fault("status_500"), Fault("drop_after"), Fault("status_429"))
    counts = asyncio.run(_deliver(StripeDelivery(_settings(standin), tmp_path / "ledger.db"), conn))
    assert counts == {outbox.DELIVERED: 200}
    _exactly_once(standin, events, _customers(conn))
    assert conn.execute("SELECT COUNT(*) FROM stripe_outbox WHERE uncertain_since IS NOT NULL").fetchone()[0] == 0
    assert [s for _, p, s in standin.requests if p == "/v2/billing/meter_event_session"][:3] == [500, 0, 429]
