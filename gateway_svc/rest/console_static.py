"""The web console's files (console/dist, built by `make setup`), served at `/` by the REST face.

What is served: `/` (and `/index.html`) is the page; `/assets/<name>` the bundles the build wrote
with a content hash in their names. Anything else is not the console's and goes on to the API's
routes (a 404 there is the API's JSON one).

Caching: a hashed asset never changes under its name, so it is `immutable` for a year; the page
is `no-cache` (revalidated with its ETag every time), so a new build is picked up at the next load.

Headers on every console response:
- Content-Security-Policy: scripts only from the gateway itself (the build writes no inline
  script), connections only to the gateway (its HTTP and WebSocket origins), frames only from the
  gateway (the live desktop's viewer page), no plugins, no `<base>`, forms only to the gateway, and
  the console itself framed by nobody (`frame-ancestors 'none'`: no clickjacking). Styles allow
  'unsafe-inline' besides 'self': xterm.js writes its theme and cell metrics as `<style>` elements
  at run time; styles cannot run code, scripts stay 'self' only;
- X-Content-Type-Options: nosniff, Referrer-Policy: same-origin, Cross-Origin-Opener-Policy:
  same-origin, and a Permissions-Policy that turns off what the console never uses.

The files are read once, at the first request, and kept in memory (the whole build is a few
hundred KiB and its source map); a missing build is a 503 saying how to make it. They come from
this checkout's console/dist, or from CYBERDESK_CONSOLE_DIR where a deployment put them.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path

from cyberdesk_common.config import env_str
from gateway_svc.rest.asgi import Scope, Send, request_headers

DEFAULT_DIST = Path(__file__).resolve().parents[2] / "console" / "dist"
ASSET_PREFIX = "/assets/"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_HOST = re.compile(r"^[A-Za-z0-9.\[\]:-]+$")
IMMUTABLE = "public, max-age=31536000, immutable"
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
    ".png": "image/png",
    ".ico": "image/x-icon",
}


@dataclass(frozen=True)
class _File:
    body: bytes
    media: str
    etag: str


def content_security_policy(host: str) -> str:
    """The console's CSP; `host` (the request's Host, checked) names the WebSocket origins explicitly."""
    sockets = f" ws://{host} wss://{host}" if host and _HOST.match(host) else ""
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data: blob:",
            "font-src 'self'",
            f"connect-src 'self'{sockets}",
            "frame-src 'self'",
            "worker-src 'self'",
            "base-uri 'none'",
            "form-action 'self'",
            "object-src 'none'",
            "frame-ancestors 'none'",
        ]
    )


def security_headers(host: str) -> list[tuple[bytes, bytes]]:
    """The headers every console response carries (see the module doc)."""
    return [
        (b"content-security-policy", content_security_policy(host).encode("latin-1")),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
        (b"cross-origin-opener-policy", b"same-origin"),
        (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
    ]


class ConsoleFiles:
    """The built console in `dist` (index.html and assets/), served from memory."""

    def __init__(self, dist: Path | None = None) -> None:
        # CYBERDESK_CONSOLE_DIR: where a deployment put the build (default: this checkout's).
        self.dist = dist or Path(env_str("CONSOLE_DIR", str(DEFAULT_DIST)))
        self._files: dict[str, _File] | None = None

    def _load(self) -> dict[str, _File]:
        if self._files is None:
            files: dict[str, _File] = {}
            index = self.dist / "index.html"
            if index.is_file():
                files["/"] = self._read(index)
                assets = self.dist / "assets"
                for path in sorted(assets.iterdir()) if assets.is_dir() else []:
                    if path.is_file() and _SAFE_NAME.match(path.name):
                        files[ASSET_PREFIX + path.name] = self._read(path)
            self._files = files
        return self._files

    @staticmethod
    def _read(path: Path) -> _File:
        body = path.read_bytes()
        media = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return _File(body, media, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    def matches(self, method: str, path: str) -> bool:
        """Whether this request is for the console's files (GET or HEAD of the page or an asset)."""
        return method in ("GET", "HEAD") and (path in ("/", "/index.html") or path.startswith(ASSET_PREFIX))

    async def serve(self, scope: Scope, send: Send) -> None:
        """Answer a request that `matches`."""
        headers = request_headers(scope)
        path = "/" if scope["path"] in ("/", "/index.html") else scope["path"]
        files = self._load()
        found = files.get(path)
        extra = security_headers(headers.get("host", ""))
        if found is None:
            if not files:
                status, body = 503, b"The console is not built: run `make setup` (or `make console`) in the checkout.\n"
            else:
                status, body = 404, b"Not found.\n"
            await self._send(
                send, scope, status, body, "text/plain; charset=utf-8", [*extra, (b"cache-control", b"no-store")]
            )
            return
        cache = b"no-cache" if path == "/" else IMMUTABLE.encode()
        extra += [(b"cache-control", cache), (b"etag", found.etag.encode())]
        if headers.get("if-none-match") == found.etag:
            await self._send(send, scope, 304, b"", found.media, extra)
            return
        await self._send(send, scope, 200, found.body, found.media, extra)

    @staticmethod
    async def _send(
        send: Send, scope: Scope, status: int, body: bytes, media: str, extra: list[tuple[bytes, bytes]]
    ) -> None:
        head = scope["method"].upper() == "HEAD"
        headers = [(b"content-type", media.encode()), *extra]
        if status != 304:
            headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head or status == 304 else body})
