"""Console sessions: an API key given once at sign-in, then a cookie that stands for it.

The web console (console/, served at `/`) must not keep the API key in the browser: anything a
page script can read (localStorage, sessionStorage, a readable cookie) is one injected script away
from being sent elsewhere. So `POST /console/session` takes the key once, verifies it exactly as
admission does (`Gate.admit`: the key, the `instances` scope, the key's rate limit), and answers
with a cookie holding a random session id (`cyberdesk_session`: HttpOnly, SameSite=Strict,
Secure when the gateway is reached over https, Path=/). The key stays in this process's memory,
never written anywhere; the browser holds only the id.

How a session is used (`Sessions.admit_scope`, called by the REST app for every HTTP request
and WebSocket handshake before routing, so REST calls, streams, file transfers, the PTY and any
other WebSocket route share it): a request that carries no key of its own but the cookie gets the
session's key put in its `x-api-key` header, and from there it is an ordinary call: admission,
scopes, rate limits, tenant scoping, and the revocation sweep (`revocation.OpenCalls` tracks calls
by key, so revoking the key ends the session's open streams and shells as it does for a key's).
Before that, the cookie must pass:

- same origin: a request whose `Origin` is not the gateway's own, or whose `Sec-Fetch-Site` says
  it came from another origin (or site), is refused. SameSite=Strict already keeps browsers from
  sending the cookie from other sites; this also refuses other origins of the same site (a
  preview host `3000-<id>.localhost` next to a console on `localhost`);
- CSRF: a state-changing HTTP request (anything but GET, HEAD, OPTIONS) must carry the session's
  CSRF token in `x-cyberdesk-csrf`. The page learns the token from the sign-in answer or from
  `GET /console/session`, which only a same-origin script can read. WebSocket handshakes are GETs
  and are covered by the Origin check (a browser always sends Origin on them);
- the key still verifies: the session's key is re-verified through the authenticator's cache (so
  at most once per CYBERDESK_AUTH_CACHE_SECONDS at the key store); once it is revoked or expired
  the session is deleted and the request refused with one sentence saying so;
- the session is not past its limits: idle for CYBERDESK_CONSOLE_SESSION_IDLE_SECONDS (default
  2 h) or older than CYBERDESK_CONSOLE_SESSION_SECONDS (default 12 h).

A request with its own key (`authorization` / `x-api-key`) ignores the cookie. Sessions live in
one gateway process: a restarted gateway, or another replica behind a balancer without sticky
sessions, does not know them and the console asks to sign in again (docs/console.md).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import grpc

from cyberdesk_common.config import env_float, env_int
from cyberdesk_common.status import RpcError, invalid_argument
from gateway_svc.auth import SCOPE_INSTANCES, Authenticator, Principal
from gateway_svc.gate import Gate
from gateway_svc.rest.asgi import Scope, request_headers
from gateway_svc.rest.cors import normalize_origin

_log = logging.getLogger("gateway_svc.sessions")

COOKIE_NAME = "cyberdesk_session"
CSRF_HEADER = "x-cyberdesk-csrf"
# Methods that change nothing: a cookie alone may make them (a download link, a page load).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# What a same-origin request says in Sec-Fetch-Site ("none": typed in the address bar, a bookmark).
_SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})
_MAX_KEY_LENGTH = 512  # far above any real key; a bigger body is not a key
# Path-form previews (`/v1/instances/<id>/ports/<port>/`) are served from the gateway's own origin,
# the console's: their pages run sandboxed, in an opaque origin of their own, or a page of the
# instance's app could call the API with the console's cookie. The host form has its own origin.
PREVIEW_PATH_FORM_CSP = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads"


@dataclass
class Session:
    """One signed-in browser: the key it stands for (in memory only) and its CSRF token."""

    secret: str
    csrf: str
    principal: Principal
    created: float
    last_used: float


@dataclass(frozen=True)
class SessionInfo:
    """What the console may know of its session (never the key)."""

    key_id: str
    tenant_id: str
    scopes: tuple[str, ...]
    csrf_token: str
    expires: float  # unix time of the absolute limit

    def to_json(self) -> dict[str, Any]:
        """The JSON body of `/console/session`."""
        return {
            "keyId": self.key_id,
            "tenantId": self.tenant_id,
            "scopes": list(self.scopes),
            "csrfToken": self.csrf_token,
            "expireTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires)),
        }


def _digest(session_id: str) -> bytes:
    # Sessions are found by the hash of their id, as keys are: the table never holds a usable id.
    return hashlib.sha256(session_id.encode()).digest()


def cookie_value(cookie_header: str, name: str = COOKIE_NAME) -> str:
    """The value of cookie `name` in a Cookie header ("" when absent)."""
    for part in cookie_header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip()
    return ""


def without_session_cookie(cookie_header: str) -> tuple[str, bool]:
    """(the Cookie header without the session cookie, whether it had one): previews strip it."""
    kept = [p.strip() for p in cookie_header.split(";") if p.strip() and p.strip().partition("=")[0] != COOKIE_NAME]
    rest = "; ".join(kept)
    return rest, len(kept) != len([p for p in cookie_header.split(";") if p.strip()])


def own_origin(scope: Scope, headers: Mapping[str, str]) -> str:
    """The origin this request reached (scheme of the connection, Host header); "" when unknown."""
    scheme = {"ws": "http", "wss": "https"}.get(str(scope.get("scheme", "http")), str(scope.get("scheme", "http")))
    host = headers.get("host", "")
    if not host:
        return ""
    try:
        return normalize_origin(f"{scheme}://{host}")
    except ValueError:
        return ""


@dataclass
class Sessions:
    """The console's sessions of one gateway process, bounded in number and in time."""

    gate: Gate
    public_url: str = ""  # CYBERDESK_GATEWAY_PUBLIC_URL: also the gateway's own origin, and https means Secure
    idle_seconds: float = 2 * 3600.0
    max_seconds: float = 12 * 3600.0
    max_sessions: int = 10_000
    _sessions: OrderedDict[bytes, Session] = field(default_factory=OrderedDict)

    @classmethod
    def from_env(cls, gate: Gate, public_url: str) -> Sessions:
        """The limits from CYBERDESK_CONSOLE_SESSION_IDLE_SECONDS, _SECONDS and CYBERDESK_CONSOLE_SESSIONS_MAX."""
        return cls(
            gate,
            public_url,
            idle_seconds=env_float("CONSOLE_SESSION_IDLE_SECONDS", 2 * 3600.0),
            max_seconds=env_float("CONSOLE_SESSION_SECONDS", 12 * 3600.0),
            max_sessions=env_int("CONSOLE_SESSIONS_MAX", 10_000, minimum=1),
        )

    @property
    def authenticator(self) -> Authenticator:
        """The gateway's key verifier (with its short cache)."""
        return self.gate.authenticator

    def __len__(self) -> int:
        return len(self._sessions)

    # -- sign-in and sign-out ---------------------------------------------------------------------

    async def sign_in(self, secret: str) -> tuple[str, SessionInfo]:
        """A new session for API key `secret`: (its id for the cookie, what the page may know).

        Raises what admission raises for the key (UNAUTHENTICATED, PERMISSION_DENIED without the
        `instances` scope, RESOURCE_EXHAUSTED past its rate limit).
        """
        secret = secret.strip()
        if not secret:
            raise invalid_argument("give an API key to sign in")
        if len(secret) > _MAX_KEY_LENGTH:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "the API key is not valid")
        principal = await self.gate.admit((("x-api-key", secret),), SCOPE_INSTANCES)
        now = time.time()
        session_id = secrets.token_urlsafe(32)
        session = Session(secret, secrets.token_urlsafe(24), principal, now, now)
        self._sessions[_digest(session_id)] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)  # the least recently used goes first
        _log.info("console session started", extra={"key_id": principal.key_id, "tenant_id": principal.tenant_id})
        return session_id, self._info(session)

    def sign_out(self, session_id: str) -> bool:
        """Delete a session; whether there was one."""
        return self._sessions.pop(_digest(session_id), None) is not None

    def _info(self, session: Session) -> SessionInfo:
        p = session.principal
        expires = session.created + self.max_seconds
        return SessionInfo(p.key_id, p.tenant_id, tuple(sorted(p.scopes)), session.csrf, expires)

    def _live(self, session_id: str) -> Session | None:
        """The session of `session_id` if it is within its limits (an expired one is deleted)."""
        digest = _digest(session_id)
        session = self._sessions.get(digest)
        if session is None:
            return None
        now = time.time()
        if now - session.created > self.max_seconds or now - session.last_used > self.idle_seconds:
            del self._sessions[digest]
            return None
        session.last_used = now
        self._sessions.move_to_end(digest)
        return session

    async def _verified(self, session_id: str) -> Session:
        """The live session whose key still verifies; UNAUTHENTICATED (and the session deleted) otherwise."""
        session = self._live(session_id) if session_id else None
        if session is None:
            raise RpcError(
                grpc.StatusCode.UNAUTHENTICATED, "the console session has ended (signed out or expired); sign in again"
            )
        if self.authenticator.metered(session.secret):
            # Each verification of a metered key spends a credit: admission's own check of the
            # call is the only one (a revoked key then fails each call, and the console signs out).
            return session
        verification = await self.authenticator.verify(session.secret)
        error = verification.to_error()
        if error is not None and error.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            self.sign_out(session_id)
            _log.info("console session ended: its key no longer verifies", extra={"key_id": session.principal.key_id})
            raise RpcError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the console session has ended: {error.message}; sign in with a valid key",
            )
        return session

    def check_origin(self, scope: Scope) -> None:
        """PERMISSION_DENIED unless the request comes from the gateway's own origin (sign-in: no login CSRF)."""
        self._check_origin(scope, request_headers(scope))

    async def describe(self, scope: Scope) -> SessionInfo:
        """The session of this request's cookie (`GET /console/session`), after the same-origin check."""
        headers = request_headers(scope)
        self._check_origin(scope, headers)
        return self._info(await self._verified(cookie_value(headers.get("cookie", ""))))

    # -- the cookie on every other request ----------------------------------------------------------

    def cookie_header(self, scope: Scope, session_id: str, max_age: int | None = None) -> str:
        """The Set-Cookie value for `session_id` ("" with max_age=0: the cookie deleted)."""
        age = int(self.max_seconds) if max_age is None else max_age
        secure = str(scope.get("scheme", "")) in ("https", "wss") or self.public_url.startswith("https://")
        return f"{COOKIE_NAME}={session_id}; Path=/; Max-Age={age}; HttpOnly; SameSite=Strict" + (
            "; Secure" if secure else ""
        )

    def _check_origin(self, scope: Scope, headers: Mapping[str, str]) -> None:
        """PERMISSION_DENIED unless the request comes from the gateway's own origin (see the module doc)."""
        origin = headers.get("origin")
        site = headers.get("sec-fetch-site")
        if origin is None and (site is None or site in _SAME_ORIGIN_FETCH):
            return
        allowed = {own_origin(scope, headers)}
        if self.public_url:
            parts = urlsplit(self.public_url)
            allowed.add(f"{parts.scheme}://{parts.netloc}".lower())
        try:
            same = origin is None or normalize_origin(origin) in allowed
        except ValueError:
            same = False  # "null": a sandboxed page or a file
        if not same or (site is not None and site not in _SAME_ORIGIN_FETCH):
            raise RpcError(
                grpc.StatusCode.PERMISSION_DENIED,
                "the console's sign-in cookie is accepted only from pages of the gateway's own origin",
            )

    async def admit_scope(self, scope: Scope) -> Scope:
        """`scope` with the session's key in `x-api-key` when it is signed in by cookie; else unchanged.

        Raises PERMISSION_DENIED (another origin, no CSRF token on a state-changing request) or
        UNAUTHENTICATED (an ended session, a revoked key).
        """
        headers = request_headers(scope)
        if "authorization" in headers or "x-api-key" in headers:
            return scope  # a key of its own: the cookie plays no part
        session_id = cookie_value(headers.get("cookie", ""))
        if not session_id:
            return scope
        self._check_origin(scope, headers)
        session = await self._verified(session_id)
        if scope["type"] == "http" and str(scope.get("method", "GET")).upper() not in SAFE_METHODS:
            given = headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(given.encode(), session.csrf.encode()):
                raise RpcError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"a request signed in by the console's cookie must send its CSRF token in {CSRF_HEADER}",
                )
        return {**scope, "headers": [*scope.get("headers", []), (b"x-api-key", session.secret.encode("latin-1"))]}
