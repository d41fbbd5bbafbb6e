"""`/console/session`: sign in with an API key (POST), see the session (GET), sign out (DELETE).

The session itself (cookie, CSRF token, same-origin rule, the key kept in memory) is
`gateway_svc.sessions`; this is its HTTP face:

- `POST /console/session` with `{"apiKey": "cd_..."}`: verifies the key as admission does and
  answers `{keyId, tenantId, scopes, csrfToken, expireTime}` with `Set-Cookie: cyberdesk_session=...`.
  Only from the gateway's own origin (no sign-in forced on a browser by another site).
- `GET /console/session`: the same JSON for the cookie's session (the page reloads and asks for its
  CSRF token again), 401 when there is none.
- `DELETE /console/session` (CSRF token required while signed in): deletes the session and the cookie.

Errors are the API's JSON Status bodies with one-sentence messages; no answer is cached.
"""

from __future__ import annotations

import hmac
import json

import grpc

from cyberdesk_common.status import RpcError, invalid_argument
from gateway_svc.rest import http_errors
from gateway_svc.rest.asgi import Receive, Scope, Send, read_body, request_headers, respond_error
from gateway_svc.sessions import CSRF_HEADER, Sessions, cookie_value

SESSION_PATH = "/console/session"
_MAX_BODY = 4096
_NO_STORE = {"cache-control": "no-store"}


async def serve_session(sessions: Sessions, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one request to `/console/session`."""
    method = scope["method"].upper()
    try:
        if method == "POST":
            sessions.check_origin(scope)
            secret = _api_key(await read_body(receive, _MAX_BODY))
            session_id, info = await sessions.sign_in(secret)
            await _json(send, 200, info.to_json(), sessions.cookie_header(scope, session_id))
        elif method == "GET":
            info = await sessions.describe(scope)
            await _json(send, 200, info.to_json())
        elif method == "DELETE":
            await _sign_out(sessions, scope, send)
        else:
            err = http_errors.method_not_allowed(method, SESSION_PATH, ["GET", "POST", "DELETE"])
            await respond_error(send, err)
    except RpcError as exc:
        err = http_errors.from_rpc_error(exc)
        await respond_error(send, http_errors.HttpError(err.status, err.body, {**err.headers, **_NO_STORE}))


async def _sign_out(sessions: Sessions, scope: Scope, send: Send) -> None:
    headers = request_headers(scope)
    session_id = cookie_value(headers.get("cookie", ""))
    if session_id:
        sessions.check_origin(scope)
        try:
            info = await sessions.describe(scope)
        except RpcError as exc:
            if exc.code is not grpc.StatusCode.UNAUTHENTICATED:
                raise
            info = None  # ended already: only the cookie is left to delete
        if info is not None:
            if not hmac.compare_digest(headers.get(CSRF_HEADER, "").encode(), info.csrf_token.encode()):
                raise RpcError(
                    grpc.StatusCode.PERMISSION_DENIED, f"signing out needs the session's CSRF token in {CSRF_HEADER}"
                )
            sessions.sign_out(session_id)
    await _json(send, 200, {}, sessions.cookie_header(scope, "", max_age=0))


def _api_key(body: bytes) -> str:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise invalid_argument('the body must be JSON: {"apiKey": "<API key>"}') from None
    key = data.get("apiKey") if isinstance(data, dict) else None
    if not isinstance(key, str) or not key.strip():
        raise invalid_argument('give an API key to sign in: {"apiKey": "<API key>"}')
    return key


async def _json(send: Send, status: int, body: object, set_cookie: str = "") -> None:
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    if set_cookie:
        headers.append((b"set-cookie", set_cookie.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
