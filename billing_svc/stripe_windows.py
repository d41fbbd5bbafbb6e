"""Closing usage windows into the Stripe outbox: what is reported, and when a window is final.

Usage goes to Stripe per (instance, meter, window), windows of CYBERDESK_BILLING_WINDOW_SECONDS
(default 60) aligned to the epoch, with the identifier `cd1:<instance>:<meter>:<window start>`
(docs/billing.md; `billing_svc.usage.identifier`). The values are the ledger's own
(`Ledger.window_values`, the rounding rule clipped to the window), so an instance's windows sum to
its ledger total.

A window [s, e) is closed once the ledger can no longer change inside it:

- the ledger's watermark (the newest event time applied) has passed e + 1 s: instance_svc
  publishes events in commit order, each stamped with its commit time, so every change before e
  is applied once one after e is; or
- nothing has been applied for CYBERDESK_STRIPE_IDLE_CLOSE_SECONDS (default 300) past e: on a
  quiet platform no event moves the watermark. An event older than that (Redis down for longer)
  still lands in the ledger, but the window it falls in was reported already: the difference
  is not sent (docs/billing.md, "What is not done").

Closing is one transaction on the ledger database: the window's outbox rows and its row in
`stripe_windows` commit together, so a kill -9 leaves a window either closed and queued or open
(and then closed again after the restart, to the same values and identifiers).

The first window closed is the one holding the oldest interval, but not older than
CYBERDESK_STRIPE_BACKFILL_SECONDS (default 24 h) before the first start with Stripe configured:
usage metered while no key was set is reported for that long back (Stripe accepts timestamps up
to 35 days old).
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Protocol

from billing_svc import outbox, usage
from billing_svc.outbox import MeterEvent
from cyberdesk_common.config import env_int

_log = logging.getLogger("billing_svc.stripe")

SCHEMA = """
CREATE TABLE IF NOT EXISTS stripe_windows (
    window_start INTEGER PRIMARY KEY,
    window_end INTEGER NOT NULL,
    closed_at INTEGER NOT NULL,
    events INTEGER NOT NULL
);
"""
WATERMARK_SKEW_US = 1_000_000  # the commit times of two instance_svc transactions may cross by this much
MAX_WINDOWS_PER_PASS = 120


class WindowSource(Protocol):
    """What the closer needs of the ledger (billing_svc.ledger.Ledger)."""

    def window_values(self, window_start_s: int, window_end_s: int, as_of_us: int) -> list[usage.WindowValue]: ...

    def watermark_us(self) -> int: ...


def event_name(meter: str) -> str:
    """The Stripe meter's event name of one of `usage.METERS` (docs/billing.md)."""
    return f"cyberdesk_{meter}"


def window_seconds() -> int:
    """CYBERDESK_BILLING_WINDOW_SECONDS: the length of a reported window (must not change while windows are unsent)."""
    return env_int("BILLING_WINDOW_SECONDS", 60, minimum=1)


def closable_until(watermark_us: int, now_s: int, idle_close_s: int) -> int:
    """The latest window end (unix seconds) that may be closed now (pure)."""
    by_events = (watermark_us - WATERMARK_SKEW_US) // usage.US if watermark_us else 0
    return max(by_events, now_s - idle_close_s)


class WindowCloser:
    """Closes finished windows into the outbox, on the deliverer's connection and thread."""

    def __init__(
        self,
        ledger: WindowSource,
        *,
        window_s: int | None = None,
        idle_close_s: int | None = None,
        backfill_s: int | None = None,
    ) -> None:
        self.ledger = ledger
        self.window_s = window_s or window_seconds()
        if idle_close_s is None:
            idle_close_s = env_int("STRIPE_IDLE_CLOSE_SECONDS", 300, minimum=0)
        if backfill_s is None:
            backfill_s = env_int("STRIPE_BACKFILL_SECONDS", 86_400, minimum=0)
        self.idle_close_s, self.backfill_s = idle_close_s, backfill_s

    def ensure_schema(self, conn: sqlite3.Connection) -> None:
        """Create `stripe_windows` when missing."""
        conn.executescript(SCHEMA)

    def _next_start(self, conn: sqlite3.Connection, now_s: int) -> int | None:
        row = conn.execute("SELECT MAX(window_end) FROM stripe_windows").fetchone()
        if row is not None and row[0] is not None:
            return int(row[0])
        # The ledger's `intervals` table (docs/billing.md, "The ledger"), read on this connection.
        first = conn.execute("SELECT MIN(start_us) FROM intervals").fetchone()
        if first is None or first[0] is None:
            return None  # nothing metered yet: the first interval decides where windows start
        start = max(int(first[0]) // usage.US, now_s - self.backfill_s)
        return start - start % self.window_s

    def close_due(self, conn: sqlite3.Connection, now_s: int) -> int:
        """Close every window that is final now (at most MAX_WINDOWS_PER_PASS); returns the rows queued."""
        start = self._next_start(conn, now_s)
        if start is None:
            return 0
        until = closable_until(self.ledger.watermark_us(), now_s, self.idle_close_s)
        queued = 0
        for _ in range(MAX_WINDOWS_PER_PASS):
            end = start + self.window_s
            if end > until:
                break
            values = self.ledger.window_values(start, end, end * usage.US)
            events = [
                MeterEvent(
                    identifier=v.identifier or usage.identifier(v.instance_id, v.meter, v.window_start_s),
                    tenant=v.tenant,
                    event_name=event_name(v.meter),
                    value=v.value,
                    timestamp=end - 1,  # the window's last second: Stripe files the event in it
                )
                for v in values
                if v.tenant
            ]
            with conn:  # one transaction: the window is closed with its rows queued, or not at all
                queued += outbox.enqueue(conn, events, now_s)
                conn.execute(
                    "INSERT OR IGNORE INTO stripe_windows (window_start, window_end, closed_at, events)"
                    " VALUES (?, ?, ?, ?)",
                    (start, end, now_s, len(events)),
                )
            start = end
        return queued
