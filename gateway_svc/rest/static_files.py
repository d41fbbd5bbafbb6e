"""Files the REST face serves from memory: the console's build and the desktop viewer's page and noVNC.

One file record and one way to answer with it, so that caching and conditional requests cannot
differ between the two: the ETag is (the start of) the body's sha256, a request whose
`If-None-Match` names it gets a 304 without a body, HEAD gets the headers without the body, and
every 200 carries its Content-Length. Each page keeps its own Content-Security-Policy (they allow
different things); `websocket_sources` is the part they share.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from gateway_svc.rest.asgi import Scope, Send, request_headers, respond

# A name that never changes its content (a hashed bundle, a versioned package file).
IMMUTABLE = "public, max-age=31536000, immutable"
# A name whose content changes with a new build: revalidated (ETag) at every load.
REVALIDATE = "no-cache"
_HOST = re.compile(r"^[A-Za-z0-9.\[\]:-]+$")


@dataclass(frozen=True)
class StaticFile:
    """A file's bytes with its media type, caching rule and ETag."""

    body: bytes
    media: str
    cache: str
    etag: str


def static_file(body: bytes, media: str, cache: str) -> StaticFile:
    """`body` as a served file (its ETag computed once, here)."""
    return StaticFile(body, media, cache, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def websocket_sources(host: str) -> str:
    """ " ws://HOST wss://HOST" for a CSP `connect-src`, "" when the request's Host is not a plain host[:port].

    'self' does not cover WebSocket origins in every browser, so they are named; a Host header
    carrying anything else (quotes, spaces, semicolons) must never be copied into a policy.
    """
    return f" ws://{host} wss://{host}" if host and _HOST.match(host) else ""


async def send_file(send: Send, scope: Scope, file: StaticFile, headers: Mapping[str, str]) -> None:
    """Answer with `file` (200, or 304 when the request names its ETag) plus `headers`."""
    extra = {**headers, "cache-control": file.cache, "etag": file.etag}
    if request_headers(scope).get("if-none-match") == file.etag:
        await respond(send, 304, b"", file.media, extra)
        return
    body = b"" if scope["method"].upper() == "HEAD" else file.body
    await respond(send, 200, body, file.media, {**extra, "content-length": str(len(file.body))})
