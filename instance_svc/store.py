"""SQLite (WAL) store of instances, snapshots, idempotency keys and the event outbox.

Invariants:
- Every state change and the outbox row announcing it are written in one transaction, so an
  event is never lost (the publisher drains the outbox) and never invented.
- A create counts the tenant's live instances and inserts the new one inside a single
  `BEGIN IMMEDIATE` transaction: SQLite takes the write lock first, so two creates racing for the
  last slot (in this process or another) are serialised and only one can win.
- Agent tokens are never written here: the runtime hands them over again after a restart.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cyberdesk_common.lifecycle_events import LifecycleEvent
from cyberdesk_common.sqlite import write_transaction
from instance_svc import paging, quotas
from instance_svc.expiry import TimeoutAction
from instance_svc.states import LIVE, State, check_transition

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    template TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    disk_mib INTEGER NOT NULL DEFAULT 0,
    state INTEGER NOT NULL,
    state_message TEXT NOT NULL DEFAULT '',
    create_time_us INTEGER NOT NULL,
    expire_time_us INTEGER NOT NULL,
    end_time_us INTEGER NOT NULL DEFAULT 0,
    timeout_us INTEGER NOT NULL,
    timeout_action INTEGER NOT NULL,
    labels TEXT NOT NULL,
    desktop TEXT NOT NULL,
    internet INTEGER NOT NULL,
    source_snapshot_id TEXT NOT NULL DEFAULT '',
    runtime TEXT NOT NULL,
    sandbox_id TEXT NOT NULL DEFAULT '',
    limits TEXT NOT NULL DEFAULT '[]',
    request_id TEXT,
    egress TEXT NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX IF NOT EXISTS instances_request ON instances(tenant, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS instances_tenant_time ON instances(tenant, create_time_us DESC, id DESC);
CREATE INDEX IF NOT EXISTS instances_state ON instances(state);
CREATE INDEX IF NOT EXISTS instances_sandbox ON instances(sandbox_id);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    create_time_us INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    includes_memory INTEGER NOT NULL,
    template TEXT NOT NULL,
    display_name TEXT NOT NULL,
    path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_tenant_time ON snapshots(tenant, create_time_us DESC, id DESC);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    payload TEXT NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox(sent, seq);
"""


@dataclass(frozen=True)
class InstanceRecord:
    """One instance as stored."""

    id: str
    tenant: str
    template: str
    vcpus: int
    memory_mib: int
    state: State
    create_time_us: int
    expire_time_us: int
    timeout_us: int
    timeout_action: TimeoutAction
    runtime: str
    labels: dict[str, str] = field(default_factory=dict)
    desktop: tuple[int, int] | None = None
    internet: bool = False
    source_snapshot_id: str = ""
    state_message: str = ""
    end_time_us: int = 0
    sandbox_id: str = ""
    limits: list[tuple[str, int, str]] = field(default_factory=list)
    disk_mib: int = 0  # 0: made before instances had disks of their own
    request_id: str | None = None
    # The egress policy as asked for (validated, normalised); empty allow = every public address.
    egress_allow: tuple[str, ...] = ()
    egress_deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class SnapshotRecord:
    """One snapshot as stored."""

    id: str
    tenant: str
    instance_id: str
    create_time_us: int
    size_bytes: int
    includes_memory: bool
    template: str
    display_name: str
    path: str


# The event record is the shared lifecycle contract (producer and every consumer use the same
# class); the outbox stores `Event.fields()` as JSON and the publisher XADDs the same fields.
Event = LifecycleEvent


class QuotaExceeded(Exception):
    """The tenant's quota has no room; the message names the limit."""


def _row_instance(row: sqlite3.Row) -> InstanceRecord:
    desktop = json.loads(row["desktop"])
    egress = json.loads(row["egress"])
    return InstanceRecord(
        id=row["id"],
        tenant=row["tenant"],
        template=row["template"],
        vcpus=row["vcpus"],
        memory_mib=row["memory_mib"],
        disk_mib=row["disk_mib"],
        state=State(row["state"]),
        create_time_us=row["create_time_us"],
        expire_time_us=row["expire_time_us"],
        timeout_us=row["timeout_us"],
        timeout_action=TimeoutAction(row["timeout_action"]),
        runtime=row["runtime"],
        labels=json.loads(row["labels"]),
        desktop=(desktop[0], desktop[1]) if desktop else None,
        internet=bool(row["internet"]),
        source_snapshot_id=row["source_snapshot_id"],
        state_message=row["state_message"],
        end_time_us=row["end_time_us"],
        sandbox_id=row["sandbox_id"],
        limits=[(n, v, m) for n, v, m in json.loads(row["limits"])],
        request_id=row["request_id"],
        egress_allow=tuple(egress.get("allow", ())),
        egress_deny=tuple(egress.get("deny", ())),
    )


def _row_snapshot(row: sqlite3.Row) -> SnapshotRecord:
    return SnapshotRecord(
        id=row["id"],
        tenant=row["tenant"],
        instance_id=row["instance_id"],
        create_time_us=row["create_time_us"],
        size_bytes=row["size_bytes"],
        includes_memory=bool(row["includes_memory"]),
        template=row["template"],
        display_name=row["display_name"],
        path=row["path"],
    )


class Store:
    """The database of one instance_svc (a file in the state directory)."""

    def __init__(self, path: Path) -> None:
        # isolation_level=None: we issue BEGIN ourselves, so each transaction is exactly what we wrote.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        # A database written before a column existed keeps its rows: CREATE TABLE IF NOT EXISTS
        # leaves an old table as it is, so new columns are added here with their defaults.
        have = {row["name"] for row in self._db.execute("PRAGMA table_info(instances)")}
        if "egress" not in have:
            self._db.execute("ALTER TABLE instances ADD COLUMN egress TEXT NOT NULL DEFAULT '{}'")
        if "disk_mib" not in have:
            self._db.execute("ALTER TABLE instances ADD COLUMN disk_mib INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._db)

    def _outbox(self, db: sqlite3.Connection, rec: InstanceRecord, old: State | None, now_us: int) -> None:
        event = Event(
            event_id=str(uuid.uuid4()),
            tenant=rec.tenant,
            instance_id=rec.id,
            old_state=old,
            new_state=rec.state,
            time_us=now_us,
            vcpus=rec.vcpus,
            memory_mib=rec.memory_mib,
            template=rec.template,
            state_message=rec.state_message,
            disk_mib=rec.disk_mib,
            desktop=rec.desktop is not None,
        )
        db.execute("INSERT INTO outbox(payload) VALUES (?)", (json.dumps(event.fields()),))

    # --- instances -------------------------------------------------------------------------

    def by_request_id(self, tenant: str, request_id: str) -> InstanceRecord | None:
        """The instance a previous create with this idempotency key made, if any."""
        row = self._db.execute(
            "SELECT * FROM instances WHERE tenant = ? AND request_id = ?", (tenant, request_id)
        ).fetchone()
        return _row_instance(row) if row else None

    def insert_within_quota(self, rec: InstanceRecord, limits: quotas.Limits) -> tuple[InstanceRecord, bool]:
        """Insert `rec` (PENDING) if the tenant's quota has room; returns (record, created).

        With a request_id already used by the tenant, returns the earlier instance and False.
        Raises QuotaExceeded naming the limit. Atomic against concurrent creates.
        """
        with self._write() as db:
            if rec.request_id is not None:
                row = db.execute(
                    "SELECT * FROM instances WHERE tenant = ? AND request_id = ?", (rec.tenant, rec.request_id)
                ).fetchone()
                if row is not None:
                    return _row_instance(row), False
            live = tuple(s.value for s in LIVE)
            count, vcpus, memory, disk = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0), COALESCE(SUM(disk_mib), 0) "
                "FROM instances "
                f"WHERE tenant = ? AND state IN ({','.join('?' * len(live))})",
                (rec.tenant, *live),
            ).fetchone()
            usage = quotas.Usage(count, vcpus, memory, disk)
            problem = quotas.decide(rec.tenant, usage, limits, rec.vcpus, rec.memory_mib, rec.disk_mib)
            if problem:
                raise QuotaExceeded(problem)
            db.execute(
                "INSERT INTO instances(id, tenant, template, vcpus, memory_mib, disk_mib, state, state_message,"
                " create_time_us,"
                " expire_time_us, timeout_us, timeout_action, labels, desktop, internet, source_snapshot_id, runtime,"
                " request_id, egress, sandbox_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.id,
                    rec.tenant,
                    rec.template,
                    rec.vcpus,
                    rec.memory_mib,
                    rec.disk_mib,
                    rec.state.value,
                    rec.state_message,
                    rec.create_time_us,
                    rec.expire_time_us,
                    rec.timeout_us,
                    rec.timeout_action.value,
                    json.dumps(rec.labels, sort_keys=True),
                    json.dumps(list(rec.desktop) if rec.desktop else None),
                    int(rec.internet),
                    rec.source_snapshot_id,
                    rec.runtime,
                    rec.request_id,
                    json.dumps({"allow": list(rec.egress_allow), "deny": list(rec.egress_deny)}),
                    rec.sandbox_id,
                ),
            )
            self._outbox(db, rec, None, rec.create_time_us)
        return rec, True

    def by_sandbox(self, sandbox_id: str) -> InstanceRecord | None:
        """The newest instance whose sandbox is `sandbox_id` (a dead sandbox names its instance)."""
        row = self._db.execute(
            "SELECT * FROM instances WHERE sandbox_id = ? ORDER BY create_time_us DESC LIMIT 1", (sandbox_id,)
        ).fetchone()
        return _row_instance(row) if row else None

    def get(self, instance_id: str) -> InstanceRecord | None:
        """The instance with this id, of any tenant."""
        row = self._db.execute("SELECT * FROM instances WHERE id = ?", (instance_id,)).fetchone()
        return _row_instance(row) if row else None

    def transition(
        self, instance_id: str, new: State, now_us: int, message: str | None = None, **changes: Any
    ) -> InstanceRecord:
        """Move an instance to `new` (checked by the state machine), with its event, atomically.

        `changes` sets other columns in the same transaction (sandbox_id, limits, expire_time_us).
        """
        with self._write() as db:
            row = db.execute("SELECT * FROM instances WHERE id = ?", (instance_id,)).fetchone()
            if row is None:
                raise KeyError(instance_id)
            rec = _row_instance(row)
            check_transition(instance_id, rec.state, new)
            updates: dict[str, Any] = {"state": new.value, **changes}
            if message is not None:
                updates["state_message"] = message
            if new.terminal:
                updates["end_time_us"] = now_us
            if "limits" in updates:
                updates["limits"] = json.dumps(updates["limits"])
            db.execute(
                f"UPDATE instances SET {', '.join(f'{k} = ?' for k in updates)} WHERE id = ?",
                (*updates.values(), instance_id),
            )
            new_rec = _row_instance(db.execute("SELECT * FROM instances WHERE id = ?", (instance_id,)).fetchone())
            self._outbox(db, new_rec, rec.state, now_us)
        return new_rec

    def update(self, instance_id: str, **changes: Any) -> InstanceRecord:
        """Change columns that are not the state (e.g. the deadline); no event."""
        if "limits" in changes:
            changes["limits"] = json.dumps(changes["limits"])
        with self._write() as db:
            db.execute(
                f"UPDATE instances SET {', '.join(f'{k} = ?' for k in changes)} WHERE id = ?",
                (*changes.values(), instance_id),
            )
        rec = self.get(instance_id)
        assert rec is not None
        return rec

    def live(self) -> list[InstanceRecord]:
        """Every non-terminal instance of every tenant (start-up reconciliation)."""
        live = tuple(s.value for s in LIVE)
        rows = self._db.execute(f"SELECT * FROM instances WHERE state IN ({','.join('?' * len(live))})", live)
        return [_row_instance(r) for r in rows]

    def list_instances(
        self,
        tenant: str,
        size: int,
        cursor: paging.Cursor | None,
        states: list[State],
        labels: dict[str, str],
    ) -> tuple[list[InstanceRecord], paging.Cursor | None]:
        """One page of a tenant's instances, newest first, and the cursor of the next page."""
        where: list[str] = ["tenant = ?"]
        args: list[Any] = [tenant]
        if cursor is not None:
            where.append("(create_time_us < ? OR (create_time_us = ? AND id < ?))")
            args += [cursor.create_time_us, cursor.create_time_us, cursor.item_id]
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += [s.value for s in states]
        for key, value in sorted(labels.items()):
            # Keys are validated against [a-z0-9_.-] before they get here; the JSON path quotes them.
            where.append("json_extract(labels, ?) = ?")
            args += [f'$."{key}"', value]
        rows = self._db.execute(
            f"SELECT * FROM instances WHERE {' AND '.join(where)} ORDER BY create_time_us DESC, id DESC LIMIT ?",
            (*args, size + 1),
        ).fetchall()
        items = [_row_instance(r) for r in rows[:size]]
        nxt = paging.Cursor(items[-1].create_time_us, items[-1].id) if len(rows) > size else None
        return items, nxt

    # --- snapshots -------------------------------------------------------------------------

    def add_snapshot(self, snap: SnapshotRecord) -> None:
        """Record a snapshot whose archive is written."""
        with self._write() as db:
            db.execute(
                "INSERT INTO snapshots VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    snap.id,
                    snap.tenant,
                    snap.instance_id,
                    snap.create_time_us,
                    snap.size_bytes,
                    int(snap.includes_memory),
                    snap.template,
                    snap.display_name,
                    snap.path,
                ),
            )

    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        """The snapshot with this id, of any tenant."""
        row = self._db.execute("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
        return _row_snapshot(row) if row else None

    def snapshot_paths(self) -> set[str]:
        """The archive path of every snapshot (the start-up sweep removes archives no record names)."""
        return {row[0] for row in self._db.execute("SELECT path FROM snapshots")}

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Forget a snapshot."""
        with self._write() as db:
            db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    def list_snapshots(
        self, tenant: str, instance_id: str, size: int, cursor: paging.Cursor | None
    ) -> tuple[list[SnapshotRecord], paging.Cursor | None]:
        """One page of a tenant's snapshots (optionally of one instance), newest first."""
        where: list[str] = ["tenant = ?"]
        args: list[Any] = [tenant]
        if instance_id:
            where.append("instance_id = ?")
            args.append(instance_id)
        if cursor is not None:
            where.append("(create_time_us < ? OR (create_time_us = ? AND id < ?))")
            args += [cursor.create_time_us, cursor.create_time_us, cursor.item_id]
        rows = self._db.execute(
            f"SELECT * FROM snapshots WHERE {' AND '.join(where)} ORDER BY create_time_us DESC, id DESC LIMIT ?",
            (*args, size + 1),
        ).fetchall()
        items = [_row_snapshot(r) for r in rows[:size]]
        nxt = paging.Cursor(items[-1].create_time_us, items[-1].id) if len(rows) > size else None
        return items, nxt

    # --- outbox ----------------------------------------------------------------------------

    def unsent(self, limit: int = 500) -> list[tuple[int, Event]]:
        """The oldest events not yet on the stream."""
        rows = self._db.execute("SELECT seq, payload FROM outbox WHERE sent = 0 ORDER BY seq LIMIT ?", (limit,))
        return [(seq, Event.from_fields(json.loads(payload))) for seq, payload in rows]

    def mark_sent(self, seqs: list[int]) -> None:
        """Mark events as published; sent rows older than the newest 10,000 are pruned."""
        if not seqs:
            return
        with self._write() as db:
            db.executemany("UPDATE outbox SET sent = 1 WHERE seq = ?", [(s,) for s in seqs])
            db.execute("DELETE FROM outbox WHERE sent = 1 AND seq < ?", (max(seqs) - 10_000,))


__all__ = ["Event", "InstanceRecord", "QuotaExceeded", "SnapshotRecord", "Store", "replace"]
