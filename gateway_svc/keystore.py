"""The local API-key store (the default backend): SQLite in the state directory.

A key is `cd_` followed by 43 URL-safe characters: 256 bits from `secrets`. Only the sha256 of a
key is stored. A slow password hash (bcrypt, scrypt, argon2) exists to make guessing *low-entropy*
secrets expensive after a database leak; a 256-bit random key cannot be guessed whatever the hash
speed (2^256 candidates), so a single sha256 is as safe here and lets every uncached verification
be one indexed lookup instead of ~100 ms of deliberate CPU work.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from google.protobuf import duration_pb2, timestamp_pb2

from cyberdesk_proto.internal.v1 import auth_pb2
from gateway_svc.auth import DEFAULT_SCOPES, Principal, Verification
from gateway_svc.ratelimit import Limit

KEY_PREFIX = "cd_"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
  key_id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  name TEXT NOT NULL,
  prefix TEXT NOT NULL,
  secret_sha256 BLOB NOT NULL UNIQUE,
  scopes TEXT NOT NULL,
  rl_limit INTEGER NOT NULL DEFAULT 0,
  rl_window_ms INTEGER NOT NULL DEFAULT 0,
  create_time REAL NOT NULL,
  revoke_time REAL
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant_id, create_time);
"""


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class KeyStore:
    """API keys in SQLite; secrets are returned once, by `create`, and never stored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # One connection shared by the event loop thread and, for the CLI, the main thread; the
        # lock serialises them (sqlite3 connections are not safe for concurrent use).
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=5.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        path.chmod(0o600)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def create(
        self, tenant_id: str, name: str, scopes: list[str] | None = None, rate_limit: Limit | None = None
    ) -> tuple[auth_pb2.ApiKey, str]:
        """Create a key; returns its record and its secret (the only time the secret exists)."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "k-" + secrets.token_hex(6)
        chosen = sorted(set(scopes or DEFAULT_SCOPES))
        limit = rate_limit.limit if rate_limit else 0
        window_ms = int(rate_limit.window_seconds * 1000) if rate_limit else 0
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys (key_id, tenant_id, name, prefix, secret_sha256, scopes, rl_limit, rl_window_ms,"
                " create_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key_id,
                    tenant_id,
                    name,
                    secret[:8],
                    _digest(secret),
                    json.dumps(chosen),
                    limit,
                    window_ms,
                    time.time(),
                ),
            )
        record = self.get(key_id)
        assert record is not None
        return record, secret

    def get(self, key_id: str) -> auth_pb2.ApiKey | None:
        """The key `key_id`, or None."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else _to_proto(row)

    def list(self, tenant_id: str, page_size: int, after_rowid: int | None) -> tuple[list[auth_pb2.ApiKey], int | None]:
        """One page of `tenant_id`'s keys, newest first, and the rowid to continue after (None at the end)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT rowid, {_COLUMNS} FROM api_keys WHERE tenant_id = ? AND rowid < ? ORDER BY rowid DESC LIMIT ?",
                (tenant_id, after_rowid if after_rowid is not None else 2**62, page_size + 1),
            ).fetchall()
        more = len(rows) > page_size
        rows = rows[:page_size]
        return [_to_proto(row[1:]) for row in rows], (rows[-1][0] if more else None)

    def revoke(self, key_id: str) -> auth_pb2.ApiKey | None:
        """Mark `key_id` revoked (idempotent: the first revocation time is kept); None when unknown."""
        with self._lock:
            self._db.execute(
                "UPDATE api_keys SET revoke_time = ? WHERE key_id = ? AND revoke_time IS NULL", (time.time(), key_id)
            )
        return self.get(key_id)

    def lookup(self, secret: str) -> Verification:
        """Verify a presented secret (synchronous; one indexed lookup)."""
        if not secret.startswith(KEY_PREFIX):
            return Verification(auth_pb2.VERIFY_CODE_NOT_FOUND)
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM api_keys WHERE secret_sha256 = ?", (_digest(secret),)
            ).fetchone()
        if row is None:
            return Verification(auth_pb2.VERIFY_CODE_NOT_FOUND)
        key = _to_proto(row)
        if key.HasField("revoke_time"):
            return Verification(auth_pb2.VERIFY_CODE_REVOKED)
        limit = None
        if key.rate_limit.limit > 0:
            limit = Limit(key.rate_limit.limit, key.rate_limit.window.ToMilliseconds() / 1000)
        principal = Principal(key.key_id, key.tenant_id, frozenset(key.scopes), limit)
        return Verification(auth_pb2.VERIFY_CODE_VALID, principal)

    async def verify(self, secret: str) -> Verification:
        """KeyBackend.verify: a local indexed lookup, fast enough to run on the event loop."""
        return self.lookup(secret)


_COLUMNS = "key_id, tenant_id, name, prefix, scopes, rl_limit, rl_window_ms, create_time, revoke_time"


def _to_proto(row: tuple[object, ...]) -> auth_pb2.ApiKey:
    key_id, tenant_id, name, prefix, scopes, rl_limit, rl_window_ms, create_time, revoke_time = row
    key = auth_pb2.ApiKey(
        key_id=str(key_id),
        tenant_id=str(tenant_id),
        name=str(name),
        prefix=str(prefix),
        scopes=json.loads(str(scopes)),
        create_time=_timestamp(float(create_time)),  # type: ignore[arg-type]
    )
    if rl_limit:
        key.rate_limit.limit = int(rl_limit)  # type: ignore[call-overload]
        key.rate_limit.window.CopyFrom(duration_pb2.Duration(seconds=0, nanos=0))
        key.rate_limit.window.FromMilliseconds(int(rl_window_ms))  # type: ignore[call-overload]
    if revoke_time is not None:
        key.revoke_time.CopyFrom(_timestamp(float(revoke_time)))  # type: ignore[arg-type]
    return key


def store_path(state: Path) -> Path:
    """Where the local key store lives below a state directory."""
    return state / "gateway_keys.sqlite3"


def create_key(
    state: Path, tenant_id: str, name: str, scopes: list[str] | None = None, rate_limit: Limit | None = None
) -> tuple[auth_pb2.ApiKey, str]:
    """Create a key in the store of a state directory (no gateway needed): how the first admin key exists."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = KeyStore(store_path(state))
    try:
        return store.create(tenant_id, name, scopes, rate_limit)
    finally:
        store.close()
