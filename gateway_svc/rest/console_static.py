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

import mimetypes
import re
from pathlib import Path

from cyberdesk_common.config import env_str
from gateway_svc.rest.asgi import Scope, Send, request_headers, respond
from gateway_svc.rest.static_files import IMMUTABLE, REVALIDATE, StaticFile, send_file, static_file, websocket_sources

DEFAULT_DIST = Path(__file__).resolve().parents[2] / "console" / "dist"
ASSET_PREFIX = "/assets/"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
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


def content_security_policy(host: str) -> str:
    """The console's CSP; `host` (the request's Host, checked) names the WebSocket origins explicitly."""
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data: blob:",
            "font-src 'self'",
            f"connect-src 'self'{websocket_sources(host)}",
            "frame-src 'self'",
            "worker-src 'self'",
            "base-uri 'none'",
            "form-action 'self'",
            "object-src 'none'",
            "frame-ancestors 'none'",
        ]
    )


def security_headers(host: str) -> dict[str, str]:
    """The headers every console response carries (see the module doc)."""
    return {
        "content-security-policy": content_security_policy(host),
        "x-content-type-options": "nosniff",
        "referrer-policy": "same-origin",
        "cross-origin-opener-policy": "same-origin",
        "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    }


class ConsoleFiles:
    """The built console in `dist` (index.html and assets/), served from memory."""

    def __init__(self, dist: Path | None = None) -> None:
        # CYBERDESK_CONSOLE_DIR: where a deployment put the build (default: this checkout's).
        self.dist = dist or Path(env_str("CONSOLE_DIR", str(DEFAULT_DIST)))
        self._files: dict[str, StaticFile] | None = None

    def _load(self) -> dict[str, StaticFile]:
        if self._files is None:
            files: dict[str, StaticFile] = {}
            index = self.dist / "index.html"
            if index.is_file():
                files["/"] = self._read(index, REVALIDATE)
                assets = self.dist / "assets"
                for path in sorted(assets.iterdir()) if assets.is_dir() else []:
                    if path.is_file() and _SAFE_NAME.match(path.name):
                        files[ASSET_PREFIX + path.name] = self._read(path, IMMUTABLE)
            self._files = files
        return self._files

    @staticmethod
    def _read(path: Path, cache: str) -> StaticFile:
        media = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return static_file(path.read_bytes(), media, cache)

    def matches(self, method: str, path: str) -> bool:
        """Whether this request is for the console's files (GET or HEAD of the page or an asset)."""
        return method in ("GET", "HEAD") and (path in ("/", "/index.html") or path.startswith(ASSET_PREFIX))

    async def serve(self, scope: Scope, send: Send) -> None:
        """Answer a request that `matches`."""
        path = "/" if scope["path"] in ("/", "/index.html") else scope["path"]
        files = self._load()
        found = files.get(path)
        extra = security_headers(request_headers(scope).get("host", ""))
        if found is None:
            if not files:
                status, body = 503, b"The console is not built: run `make setup` (or `make console`) in the checkout.\n"
            else:
                status, body = 404, b"Not found.\n"
            extra |= {"cache-control": "no-store", "content-length": str(len(body))}
            head = scope["method"].upper() == "HEAD"
            await respond(send, status, b"" if head else body, "text/plain; charset=utf-8", extra)
            return
        await send_file(send, scope, found, extra)
