"""SQLite helpers shared by the services that keep a local database (instance_svc's store, billing_svc's ledger)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on `db` (opened with isolation_level=None): committed at the end, rolled back on any error.

    BEGIN IMMEDIATE takes the write lock up front, so a transaction that read first never fails
    to upgrade (SQLITE_BUSY) halfway because another writer came in between; a cancelled task or
    Ctrl-C (BaseException) rolls back too, so nothing half-written is ever committed.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
