"""gateway_svc.sessions without a browser: the rules a console session's cookie must pass.

A real key store (SQLite in a temporary directory) and the real rate limiter on the session's
redis-server; ASGI scopes built by hand, as uvicorn would hand them to the REST app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cyberdesk_common.status import RpcError
from gateway_svc.auth import Authenticator
from gateway_svc.gate import Gate
from gateway_svc.keystore import KeyStore
from gateway_svc.ratelimit import Limit, RateLimiter
from gateway_svc.sessions import COOKIE_NAME, CSRF_HEADER, Sessions, without_session_cookie

pytestmark = pytest.mark.anyio
HOST = "127.0.0.1:8080"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def setting(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[Sessions, KeyStore]]:
    store = KeyStore(tmp_path / "keys.sqlite3")
    limiter = RateLimiter(redis_url)
    # No cache: a revocation is seen at the next request (the gateway's cache is CYBERDESK_AUTH_CACHE_SECONDS).
    gate = Gate(Authenticator(store, ttl=0), limiter, Limit(1000, 1.0))
    try:
        yield Sessions(gate, "http://" + HOST), store
    finally:
        await limiter.close()
        store.close()


def scope(
    session_id: str = "", method: str = "GET", kind: str = "http", scheme: str = "http", **headers: str
) -> dict[str, Any]:
    raw = [(b"host", HOST.encode())]
    if session_id:
        raw.append((b"cookie", f"other=1; {COOKIE_NAME}={session_id}".encode()))
    raw += [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    return {"type": kind, "method": method, "scheme": scheme, "path": "/v1/instances", "headers": raw}


def api_key(admitted: dict[str, Any]) -> str | None:
    found = [v.decode() for k, v in admitted["headers"] if k == b"x-api-key"]
    return found[0] if found else None


async def refused(sessions: Sessions, request: dict[str, Any]) -> RpcError:
    with pytest.raises(RpcError) as caught:
        await sessions.admit_scope(request)
    return caught.value


async def test_a_signed_in_cookie_stands_for_its_key(setting: tuple[Sessions, KeyStore]) -> None:
    sessions, store = setting
    _, secret = store.create("acme", "console")
    session_id, info = await sessions.sign_in(secret)
    assert (info.tenant_id, info.scopes) == ("acme", ("instances",))
    assert secret not in session_id and secret not in str(info.to_json())
    # A same-origin browser request (Sec-Fetch-Site), one with the page's Origin, and one of a
    # client that sends neither (curl with the cookie) all get the key.
    for request in (
        scope(session_id, sec_fetch_site="same-origin"),
        scope(session_id, origin="http://" + HOST),
        scope(session_id),
        scope(session_id, kind="websocket", scheme="ws", origin="http://" + HOST),
    ):
        assert api_key(await sessions.admit_scope(request)) == secret
    # No cookie: unchanged. A key of its own: the cookie plays no part.
    assert api_key(await sessions.admit_scope(scope())) is None
    own = scope("not-a-session", authorization="Bearer cd_x")
    assert await sessions.admit_scope(own) is own


async def test_bad_keys_start_no_session(setting: tuple[Sessions, KeyStore]) -> None:
    sessions, store = setting
    for bad, code, text in (
        ("cd_" + "x" * 43, grpc.StatusCode.UNAUTHENTICATED, "the API key is not valid"),
        ("  ", grpc.StatusCode.INVALID_ARGUMENT, "give an API key to sign in"),
        ("cd_" + "x" * 5000, grpc.StatusCode.UNAUTHENTICATED, "the API key is not valid"),
    ):
        with pytest.raises(RpcError) as caught:
            await sessions.sign_in(bad)
        assert (caught.value.code, caught.value.message) == (code, text)
    key, secret = store.create("acme", "revoked")
    store.revoke(key.key_id)
    with pytest.raises(RpcError) as caught:
        await sessions.sign_in(secret)
    assert caught.value.message == "the API key was revoked or disabled"
    assert len(sessions) == 0


async def test_other_origins_never_use_the_cookie(setting: tuple[Sessions, KeyStore]) -> None:
    sessions, store = setting
    _, secret = store.create("acme", "console")
    session_id, _ = await sessions.sign_in(secret)
    for request in (
        scope(session_id, origin="http://evil.example"),
        scope(session_id, origin="null"),
        scope(session_id, sec_fetch_site="cross-site"),
        # Same site, another origin: a preview host next to the console.
        scope(session_id, sec_fetch_site="same-site", origin="http://3000-i-abc.localhost:8080"),
        scope(session_id, kind="websocket", scheme="ws", origin="http://evil.example"),
    ):
        err = await refused(sessions, request)
        assert err.code is grpc.StatusCode.PERMISSION_DENIED
        assert "own origin" in err.message


async def test_state_changing_requests_need_the_csrf_token(setting: tuple[Sessions, KeyStore]) -> None:
    sessions, store = setting
    _, secret = store.create("acme", "console")
    session_id, info = await sessions.sign_in(secret)
    for method in ("POST", "PUT", "DELETE"):
        for given in ({}, {"x_cyberdesk_csrf": "wrong"}):
            err = await refused(sessions, scope(session_id, method, origin="http://" + HOST, **given))
            assert err.code is grpc.StatusCode.PERMISSION_DENIED and CSRF_HEADER in err.message
        ok = scope(session_id, method, origin="http://" + HOST, x_cyberdesk_csrf=info.csrf_token)
        assert api_key(await sessions.admit_scope(ok)) == secret


async def test_revoking_the_key_ends_the_session(setting: tuple[Sessions, KeyStore]) -> None:
    sessions, store = setting
    key, secret = store.create("acme", "console")
    session_id, _ = await sessions.sign_in(secret)
    store.revoke(key.key_id)
    err = await refused(sessions, scope(session_id))
    assert err.code is grpc.StatusCode.UNAUTHENTICATED
    assert err.message == "the console session has ended: the API key was revoked or disabled; sign in with a valid key"
    assert len(sessions) == 0  # deleted, not only refused
    err = await refused(sessions, scope(session_id))
    assert err.message.startswith("the console session has ended (signed out or expired)")


async def test_sessions_end_when_idle_too_old_signed_out_or_crowded_out(setting: tuple[Sessions, KeyStore]) -> None:
    sessions, store = setting
    _, secret = store.create("acme", "console")
    idle, _ = await sessions.sign_in(secret)
    sessions.idle_seconds = 0
    assert (await refused(sessions, scope(idle))).code is grpc.StatusCode.UNAUTHENTICATED
    sessions.idle_seconds, sessions.max_seconds = 3600, 0
    old, _ = await sessions.sign_in(secret)
    assert (await refused(sessions, scope(old))).code is grpc.StatusCode.UNAUTHENTICATED
    sessions.max_seconds, sessions.max_sessions = 3600, 2
    first, _ = await sessions.sign_in(secret)
    second, _ = await sessions.sign_in(secret)
    third, _ = await sessions.sign_in(secret)
    assert len(sessions) == 2
    assert (await refused(sessions, scope(first))).code is grpc.StatusCode.UNAUTHENTICATED  # the oldest went
    assert sessions.sign_out(second) and not sessions.sign_out(second)
    assert api_key(await sessions.admit_scope(scope(third))) == secret


def test_cookie_flags_and_what_previews_never_see(tmp_path: Path) -> None:
    sessions = Sessions(gate=None, public_url="http://" + HOST)  # type: ignore[arg-type]
    plain = sessions.cookie_header(scope(), "abc")
    assert plain == f"{COOKIE_NAME}=abc; Path=/; Max-Age=43200; HttpOnly; SameSite=Strict"
    assert sessions.cookie_header(scope(scheme="https"), "abc").endswith("; Secure")
    assert "Max-Age=0" in sessions.cookie_header(scope(), "", max_age=0)
    assert without_session_cookie(f"a=1; {COOKIE_NAME}=s3cret; b=2") == ("a=1; b=2", True)
    assert without_session_cookie("a=1; b=2") == ("a=1; b=2", False)
