"""billing_svc as a process: kill -9 while it applies a backlog (mostly inside a batch), then restart.

The ledger ends with every event exactly once (distinct event ids, duplicates in the stream
included) and every tenant's totals equal the generator's; nothing is left pending in the group.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from billing_svc.ledger import Ledger
from billing_svc.meter import GROUP
from cyberdesk_common.lifecycle_events import STREAM
from cyberdesk_stack import processes
from tests.billing_svc.events import lifecycles
from tests.support.waiting import wait_until as wait_for


@pytest.fixture
def stream_url(redis_url: str) -> Iterator[str]:
    """The session's Redis, a database of its own (emptied)."""
    url = redis_url.rsplit("/", 1)[0] + "/12"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def _count(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM transitions").fetchone()[0])
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    finally:
        conn.close()


def test_kill_9_mid_backlog_then_restart_loses_nothing_and_doubles_nothing(stream_url: str, tmp_path: Path) -> None:
    # Large enough that the kill lands inside it: a quiet machine applies ~10,000 events a second.
    events, expected = lifecycles(4000, tenants=10)
    client = redis.Redis.from_url(stream_url, decode_responses=True)
    pipe = client.pipeline(transaction=False)
    for event in events + events[::10]:  # every tenth published twice
        pipe.xadd(STREAM, event.fields())  # type: ignore[arg-type]
    pipe.execute()
    state = tmp_path / "state"
    state.mkdir()
    db = state / "billing" / "ledger.db"
    addr = f"127.0.0.1:{processes.free_port()}"
    env = {
        "CYBERDESK_STATE_DIR": str(state),
        "CYBERDESK_BILLING_ADDR": addr,
        "REDIS_URL": stream_url,
        "CYBERDESK_BILLING_CONSUMER": "billing-test",
    }
    log = tmp_path / "billing_svc.log"
    kills = 0
    for fraction in (0.1,):
        proc = processes.spawn([sys.executable, "-m", "billing_svc"], env, log)
        try:
            processes.wait_healthy(addr, timeout=30, proc=proc)
            # Killed while it works through the backlog: after some batches, mostly inside one.
            target = fraction * len(events)
            wait_for("progress", lambda t=target: _count(db) > t, timeout=60, every=0.01)  # type: ignore[misc]
            if _count(db) < len(events):
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
    assert kills == 1, "the backlog was applied before the kill could land"
    proc = processes.spawn([sys.executable, "-m", "billing_svc"], env, log)
    try:
        processes.wait_healthy(addr, timeout=30, proc=proc)
        wait_for("the whole backlog", lambda: _count(db) == len(events), timeout=60)
        wait_for("nothing pending", lambda: client.xpending(STREAM, GROUP)["pending"] == 0, timeout=30)
    finally:
        assert processes.stop(proc) == 0, log.read_text()
    ledger = Ledger(db)
    assert ledger.event_count() == len(events)
    for tenant, seconds in expected.running.items():
        total = ledger.usage(tenant, 0, 2**62, 2**62).total
        assert (total.instance_seconds, total.paused_seconds, total.vcpu_seconds) == (
            seconds,
            expected.paused[tenant],
            expected.vcpu[tenant],
        ), tenant
    ledger.close()
    client.close()
