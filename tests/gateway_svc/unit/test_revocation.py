"""OpenCalls: a swept key that no longer verifies ends its tracked calls with UNAUTHENTICATED; nothing else does.

The backend is the real local key store (SQLite in a temporary directory); the calls are plain
asyncio tasks standing in for handler tasks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from cyberdesk_common.status import RpcError
from cyberdesk_proto.internal.v1 import auth_pb2
from gateway_svc.auth import Authenticator, Principal, Verification
from gateway_svc.keystore import KeyStore
from gateway_svc.revocation import OpenCalls


def _calls(tmp_path: Path) -> tuple[OpenCalls, KeyStore]:
    store = KeyStore(tmp_path / "keys.sqlite3")
    return OpenCalls(Authenticator(store, ttl=60), interval=0.05), store


def test_revoking_a_key_ends_only_its_calls_and_drops_it_from_the_cache(tmp_path: Path) -> None:
    calls, store = _calls(tmp_path)
    revoked, secret = store.create("t", "a")
    _, other = store.create("t", "b")

    async def call(key: str) -> str:
        async with calls.track((("authorization", f"Bearer {key}"),)):
            await asyncio.sleep(3600)
        return "finished"

    async def scenario() -> tuple[BaseException | str, BaseException | str, int, int]:
        assert calls.authenticator is not None
        await calls.authenticator.verify(secret)  # cached as VALID, as an admitted call leaves it
        first, second = asyncio.create_task(call(secret)), asyncio.create_task(call(other))
        await asyncio.sleep(0.01)
        assert calls.open_count() == 2 and await calls.sweep() == 0
        store.revoke(revoked.key_id)
        ended = await calls.sweep()
        results = await asyncio.gather(first, asyncio.wait_for(asyncio.shield(second), 0.1), return_exceptions=True)
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        cached = (await calls.authenticator.verify(secret)).code
        return results[0], results[1], ended, cached

    first, second, ended, cached = asyncio.run(scenario())
    assert isinstance(first, RpcError) and first.code is grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in first.message
    assert isinstance(second, TimeoutError)  # the other key's call is still running
    assert ended == 1
    assert cached == auth_pb2.VERIFY_CODE_REVOKED  # not the cached VALID: it left the cache
    assert calls.open_count() == 0


def test_a_callers_own_cancellation_stays_a_cancellation(tmp_path: Path) -> None:
    calls, store = _calls(tmp_path)
    _, secret = store.create("t", "a")

    async def scenario() -> None:
        async def call() -> None:
            async with calls.track((("x-api-key", secret),)):
                await asyncio.sleep(3600)

        task = asyncio.create_task(call())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert calls.open_count() == 0


def test_a_call_without_a_key_is_not_tracked(tmp_path: Path) -> None:
    calls, _ = _calls(tmp_path)

    async def scenario() -> int:
        async with calls.track(()):
            return calls.open_count()

    assert asyncio.run(scenario()) == 0


class MeteredBackend:
    """Stands in for Unkey with a metered key: every verification spends a credit (counted here)."""

    def __init__(self) -> None:
        self.verifications = 0

    async def verify(self, secret: str) -> Verification:
        self.verifications += 1
        return Verification(auth_pb2.VERIFY_CODE_VALID, Principal("k-1", "t", frozenset()), cacheable=False)


def test_a_metered_key_is_not_re_verified_by_the_sweep() -> None:
    backend = MeteredBackend()
    calls = OpenCalls(Authenticator(backend, ttl=60), interval=0.05)

    async def scenario() -> int:
        assert calls.authenticator is not None
        await calls.authenticator.verify("cd_metered")  # the admission of the call: one credit

        async def call() -> None:
            async with calls.track((("x-api-key", "cd_metered"),)):
                await asyncio.sleep(3600)

        task = asyncio.create_task(call())
        await asyncio.sleep(0.01)
        assert await calls.sweep() == 0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return backend.verifications

    assert asyncio.run(scenario()) == 1
