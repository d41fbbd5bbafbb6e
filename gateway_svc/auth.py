"""API-key authentication: where a caller's key is read, verified, cached and checked for scope.

Pure parts (`extract_key`, `require_scope`, `Verification.to_error`) are separate from I/O so that
the REST face can reuse them with HTTP headers. The backends (local key store, Unkey) sit behind
`KeyBackend`; `Authenticator` adds a bounded, short-lived in-process cache in front of either.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from cyberdesk_common.status import RpcError, resource_exhausted
from cyberdesk_proto.internal.v1 import auth_pb2
from gateway_svc.ratelimit import Limit

SCOPE_INSTANCES = "instances"
SCOPE_ADMIN = "admin"
DEFAULT_SCOPES = (SCOPE_INSTANCES,)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the verified key, its tenant and what it may do."""

    key_id: str
    tenant_id: str
    scopes: frozenset[str]
    rate_limit: Limit | None = None  # None: the gateway's default
    remaining_credits: int = -1  # -1: unlimited


@dataclass(frozen=True)
class Verification:
    """A backend's answer for one presented secret."""

    code: int  # auth_pb2.VerifyCode
    principal: Principal | None = None
    retry_after: float | None = None  # for RATE_LIMITED answers of a backend that limits itself
    detail: str = ""
    # Whether the answer may be reused for a few seconds. A key with metered credits is not
    # cached: every call must spend one at the backend.
    cacheable: bool = True

    def to_error(self) -> RpcError | None:
        """The status a caller gets for this answer, or None when the key is valid."""
        code = self.code
        if code == auth_pb2.VERIFY_CODE_VALID and self.principal is not None:
            return None
        if code == auth_pb2.VERIFY_CODE_RATE_LIMITED:
            return resource_exhausted(
                "the API key's rate limit at the key service is reached; retry later", self.retry_after or 1.0
            )
        if code == auth_pb2.VERIFY_CODE_USAGE_EXCEEDED:
            return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the API key has no credits left")
        if code == auth_pb2.VERIFY_CODE_FORBIDDEN:
            return RpcError(grpc.StatusCode.PERMISSION_DENIED, self.detail or "the API key lacks a required permission")
        reasons: dict[int, str] = {
            auth_pb2.VERIFY_CODE_REVOKED: "the API key was revoked or disabled",
            auth_pb2.VERIFY_CODE_EXPIRED: "the API key has expired",
        }
        reason = reasons.get(int(code), "the API key is not valid")
        return RpcError(grpc.StatusCode.UNAUTHENTICATED, reason)


class KeyBackend(Protocol):
    """Where keys are verified: the local key store or Unkey."""

    async def verify(self, secret: str) -> Verification:
        """Verify `secret`; never raises for a bad key (that is a Verification with its code)."""
        ...


def extract_key(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The API key from `authorization: Bearer <key>` or `x-api-key: <key>` metadata.

    Raises UNAUTHENTICATED when neither is present or the authorization value is not a bearer
    token, with a message saying how to send the key.
    """
    bearer: str | None = None
    api_key: str | None = None
    for name, raw in metadata:
        value = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "the authorization metadata must be 'Bearer <API key>'")
            bearer = token.strip()
        elif name == "x-api-key":
            api_key = value.strip()
    key = bearer or api_key
    if not key:
        raise RpcError(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing API key: send 'authorization: Bearer <API key>' or 'x-api-key: <API key>' metadata",
        )
    return key


def require_scope(principal: Principal, scope: str) -> None:
    """PERMISSION_DENIED unless the key has `scope` (admin keys have every scope)."""
    if scope not in principal.scopes and SCOPE_ADMIN not in principal.scopes:
        raise RpcError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"the API key {principal.key_id} lacks the '{scope}' scope this call needs",
        )


@dataclass
class _Entry:
    expires: float
    verification: Verification


@dataclass
class Authenticator:
    """Verifies presented keys through a backend, with a bounded LRU cache of valid answers.

    Only VALID answers are cached, for `ttl` seconds: a revoked key keeps working for at most
    `ttl` seconds on each gateway replica, and a flood of bad keys cannot evict good entries.
    Calls admitted before a revocation are ended within the same bound by `revocation.OpenCalls`.
    Entries are keyed by the sha256 of the secret so no raw key sits in the cache.
    """

    backend: KeyBackend
    ttl: float = 5.0
    max_entries: int = 10_000
    _cache: OrderedDict[bytes, _Entry] = field(default_factory=OrderedDict)
    _inflight: dict[bytes, asyncio.Future[Verification]] = field(default_factory=dict)
    # Keys whose answers may not be reused (metered credits), as last seen: a re-verification of
    # those would spend a credit, so the revocation sweep leaves them alone (revocation.py).
    _metered: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    async def verify(self, secret: str) -> Verification:
        """The (possibly cached) verification of `secret`."""
        digest = hashlib.sha256(secret.encode()).digest()
        now = time.monotonic()
        entry = self._cache.get(digest)
        if entry is not None:
            if entry.expires > now:
                self._cache.move_to_end(digest)
                return entry.verification
            del self._cache[digest]
        # Concurrent calls with the same uncached key share one backend round trip.
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Verification] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            result = await self.backend.verify(secret)
            future.set_result(result)
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            del self._inflight[digest]
        if not result.cacheable:
            self._metered[digest] = None
            while len(self._metered) > self.max_entries:
                self._metered.popitem(last=False)
        else:
            self._metered.pop(digest, None)
        if self.ttl > 0 and result.cacheable and result.code == auth_pb2.VERIFY_CODE_VALID:
            self._cache[digest] = _Entry(time.monotonic() + self.ttl, result)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return result

    def metered(self, secret: str) -> bool:
        """Whether the last answer for `secret` said it may not be reused (each verification spends a credit)."""
        return hashlib.sha256(secret.encode()).digest() in self._metered

    def forget(self, secret: str) -> None:
        """Drop the cached answer for `secret` (its key was found revoked: refuse it from now on)."""
        self._cache.pop(hashlib.sha256(secret.encode()).digest(), None)

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Principal:
        """The caller's principal, or an RpcError (UNAUTHENTICATED, RESOURCE_EXHAUSTED...)."""
        verification = await self.verify(extract_key(metadata))
        error = verification.to_error()
        if error is not None:
            raise error
        assert verification.principal is not None  # to_error() returned None
        return verification.principal
