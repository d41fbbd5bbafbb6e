"""The SQLite store: atomic quota under racing writers, events in the same transaction, paging, egress."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from instance_svc import paging, quotas
from instance_svc.expiry import US, TimeoutAction
from instance_svc.states import IllegalRequest, State
from instance_svc.store import InstanceRecord, QuotaExceeded, Store


def _rec(i: int, tenant: str = "t", **kw: object) -> InstanceRecord:
    fields: dict[str, object] = {
        "id": f"i-{i:012x}",
        "tenant": tenant,
        "template": "base",
        "vcpus": 1,
        "memory_mib": 512,
        "state": State.PENDING,
        "create_time_us": 1_000 * US + i,
        "expire_time_us": 2_000 * US,
        "timeout_us": 300 * US,
        "timeout_action": TimeoutAction.TERMINATE,
        "runtime": "local",
        **kw,
    }
    return InstanceRecord(**fields)  # type: ignore[arg-type]


def test_racing_creates_from_separate_connections_respect_the_quota(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    Store(db).close()
    limits = quotas.Limits(instances=10, vcpus=100, memory_mib=100_000)
    wins: list[str] = []
    losses: list[str] = []
    barrier = threading.Barrier(50)

    def create(i: int) -> None:
        store = Store(db)  # one connection per writer, like separate processes
        barrier.wait()
        try:
            store.insert_within_quota(_rec(i), limits)
            wins.append(str(i))
        except QuotaExceeded as err:
            losses.append(str(err))
        finally:
            store.close()

    threads = [threading.Thread(target=create, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 10 and len(losses) == 40
    assert set(losses) == {"tenant t has 10 of 10 concurrent instances"}


def test_terminal_instances_free_the_quota_and_events_follow_every_change(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    limits = quotas.Limits(instances=1)
    rec, created = store.insert_within_quota(_rec(1), limits)
    assert created
    with pytest.raises(QuotaExceeded):
        store.insert_within_quota(_rec(2), limits)
    store.transition(rec.id, State.STARTING, 5)
    with pytest.raises(IllegalRequest, match="STARTING and cannot become PAUSED"):
        store.transition(rec.id, State.PAUSED, 6)
    store.transition(rec.id, State.FAILED, 7, "no room")
    assert store.get(rec.id).end_time_us == 7  # type: ignore[union-attr]
    store.insert_within_quota(_rec(2), limits)
    events = [e for _, e in store.unsent()]
    assert [(e.old_state, e.new_state) for e in events] == [
        (None, State.PENDING),
        (State.PENDING, State.STARTING),
        (State.STARTING, State.FAILED),
        (None, State.PENDING),
    ]
    assert events[2].state_message == "no room" and events[2].vcpus == 1 and events[2].template == "base"
    assert len({e.event_id for e in events}) == 4
    store.mark_sent([seq for seq, _ in store.unsent()])
    assert store.unsent() == []


def test_request_id_returns_the_first_instance(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    first, created = store.insert_within_quota(_rec(1, request_id="r1"), quotas.Limits())
    again, created_again = store.insert_within_quota(_rec(2, request_id="r1"), quotas.Limits())
    assert created and not created_again and again.id == first.id
    other, created_other = store.insert_within_quota(_rec(3, tenant="u", request_id="r1"), quotas.Limits())
    assert created_other and other.id != first.id


def test_list_pages_filters_and_tenants(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    big = quotas.Limits(instances=100, vcpus=100, memory_mib=100_000)
    for i in range(7):
        store.insert_within_quota(_rec(i, labels={"team": "a" if i % 2 else "b"}), big)
    store.insert_within_quota(_rec(99, tenant="other"), big)
    seen: list[str] = []
    cursor = None
    while True:
        items, cursor = store.list_instances("t", 3, cursor, [], {})
        seen += [r.id for r in items]
        if cursor is None:
            break
        cursor = paging.decode(paging.encode(cursor, "i"), "i")
    assert seen == [f"i-{i:012x}" for i in reversed(range(7))]
    team_a, _ = store.list_instances("t", 50, None, [], {"team": "a"})
    assert [r.id for r in team_a] == [f"i-{i:012x}" for i in (5, 3, 1)]
    store.transition("i-000000000003", State.FAILED, 1)
    failed, _ = store.list_instances("t", 50, None, [State.FAILED], {})
    assert [r.id for r in failed] == ["i-000000000003"]


# --- the egress policy -------------------------------------------------------------------------


def test_policy_round_trips_and_an_old_database_gets_the_column(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    store = Store(db)
    limits = quotas.Limits(instances=10, vcpus=100, memory_mib=100_000)
    store.insert_within_quota(
        _rec(1, internet=True, egress_allow=("pypi.org", "198.18.0.0/15"), egress_deny=("::1",)), limits
    )
    store.insert_within_quota(_rec(2), limits)
    got = store.get("i-000000000001")
    assert got is not None and got.egress_allow == ("pypi.org", "198.18.0.0/15") and got.egress_deny == ("::1",)
    plain = store.get("i-000000000002")
    assert plain is not None and plain.egress_allow == () and plain.egress_deny == ()
    store.close()

    # A database from before the column: its rows stay, and read as "no policy".
    raw = sqlite3.connect(db)
    raw.execute("ALTER TABLE instances DROP COLUMN egress")
    raw.commit()
    raw.close()
    reopened = Store(db)
    old = reopened.get("i-000000000002")
    assert old is not None and old.egress_allow == () and old.egress_deny == ()
    reopened.insert_within_quota(_rec(3, egress_deny=("203.0.113.0/24",)), limits)
    new = reopened.get("i-000000000003")
    assert new is not None and new.egress_deny == ("203.0.113.0/24",)
    reopened.close()
