"""The egress policy in the SQLite store: stored with the instance, read back, and added to an older database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from instance_svc import quotas
from instance_svc.expiry import US, TimeoutAction
from instance_svc.states import State
from instance_svc.store import InstanceRecord, Store


def _rec(i: int, **kw: object) -> InstanceRecord:
    fields: dict[str, object] = {
        "id": f"i-{i:012x}",
        "tenant": "t",
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
