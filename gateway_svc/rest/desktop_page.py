"""The live desktop's viewer page, `/desktop/{instance_id}`, and its files, served by the REST face.

What is served:

* `/desktop/{id}`: `desktop_viewer/viewer.html`, the same for every instance (it holds no data; the
  instance is read from the path and the token from the fragment by the page's script, and the
  stream admits the viewer). Without a token in the fragment the stream is admitted by whatever
  else the browser presents (a console session), so the console can embed the bare page too.
* `/desktop/static/viewer.js`, `viewer.css`: the page's own script and style.
* `/desktop/static/novnc/<version>/{core,vendor}/...js`: noVNC's ES modules, exactly as npm
  installed them (web/package-lock.json, `make setup`); browsers load them as modules, no bundler.

Caching: noVNC's files sit under their version, so they are `immutable` for a year; the page and
its own script are `no-cache` with an ETag (revalidated at every load, 304 when unchanged).
Headers: a Content-Security-Policy that allows scripts, styles and connections to the gateway only
(the stream's WebSocket origins named explicitly), images from data:/blob: (noVNC decodes JPEG
rectangles and the cursor that way) and framing by the gateway's own pages only
(`frame-ancestors 'self'`: the console embeds it; another site cannot), plus nosniff and
`Referrer-Policy: no-referrer`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import grpc

from gateway_svc.rest import http_errors
from gateway_svc.rest.asgi import Scope, Send, request_headers, respond, respond_error
from gateway_svc.rest.desktop_links import STATIC_PREFIX, match_page

ROOT = Path(__file__).resolve().parents[2]
PAGE_DIR = Path(__file__).resolve().parent / "desktop_viewer"
DEFAULT_NOVNC = ROOT / "web" / "node_modules" / "@novnc" / "novnc"
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
_NOVNC_FILE = re.compile(r"^(core|vendor)/[A-Za-z0-9_./-]+\.js$")
_HOST = re.compile(r"^[A-Za-z0-9.\[\]:-]+$")


@dataclass(frozen=True)
class _File:
    body: bytes
    media: str
    etag: str
    cache: str


def content_security_policy(host: str) -> str:
    """The viewer page's CSP; `host` (the request's Host, checked) names the stream's WebSocket origins."""
    sockets = f" ws://{host} wss://{host}" if host and _HOST.match(host) else ""
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data: blob:",
            f"connect-src 'self'{sockets}",
            "base-uri 'none'",
            "form-action 'none'",
            "object-src 'none'",
            "frame-ancestors 'self'",
        ]
    )


def _file(body: bytes, media: str, cache: str) -> _File:
    return _File(body, media, '"' + hashlib.sha256(body).hexdigest()[:32] + '"', cache)


class DesktopPages:
    """The viewer page and its files; noVNC is read from `novnc_dir` (web/node_modules by default)."""

    def __init__(self, novnc_dir: Path = DEFAULT_NOVNC) -> None:
        self.novnc_dir = novnc_dir
        self._files: dict[str, _File] | None = None
        self._version = ""

    def matches(self, method: str, path: str) -> bool:
        """Whether the request is for the viewer page or its files."""
        return method in ("GET", "HEAD") and (path.startswith(STATIC_PREFIX) or match_page(path) is not None)

    def _load(self) -> dict[str, _File]:
        if self._files is None:
            meta = json.loads((self.novnc_dir / "package.json").read_text())
            self._version = str(meta["version"])
            novnc = f"{STATIC_PREFIX}novnc/{self._version}"
            script = (PAGE_DIR / "viewer.js").read_text().replace("__NOVNC__", novnc).encode()
            self._files = {
                "page": _file((PAGE_DIR / "viewer.html").read_bytes(), "text/html; charset=utf-8", REVALIDATE),
                f"{STATIC_PREFIX}viewer.js": _file(script, _TYPES[".js"], REVALIDATE),
                f"{STATIC_PREFIX}viewer.css": _file((PAGE_DIR / "viewer.css").read_bytes(), _TYPES[".css"], REVALIDATE),
            }
        return self._files

    def _novnc(self, path: str) -> _File | None:
        prefix = f"{STATIC_PREFIX}novnc/{self._version}/"
        if not path.startswith(prefix):
            return None
        rel = path[len(prefix) :]
        if not _NOVNC_FILE.match(rel) or ".." in rel.split("/"):
            return None
        file = (self.novnc_dir / rel).resolve()
        if not file.is_relative_to(self.novnc_dir.resolve()) or not file.is_file():
            return None
        found = _file(file.read_bytes(), _TYPES[".js"], IMMUTABLE)
        assert self._files is not None
        self._files[path] = found  # the package is a few hundred KiB: kept once read
        return found

    async def serve(self, scope: Scope, send: Send) -> None:
        """Answer a request `matches` accepted."""
        path: str = scope["path"]
        try:
            files = self._load()
        except (OSError, ValueError, KeyError):
            missing = http_errors.from_status(
                grpc.StatusCode.UNAVAILABLE, "the desktop viewer (noVNC, web/) is not installed; run `make setup`"
            )
            await respond_error(send, http_errors.HttpError(503, missing.body, missing.headers))
            return
        found = files.get("page" if match_page(path) is not None else path) or self._novnc(path)
        if found is None:
            await respond_error(send, http_errors.route_not_found(scope["method"], path))
            return
        headers = request_headers(scope)
        extra = {
            "cache-control": found.cache,
            "etag": found.etag,
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
        }
        if found.media.startswith("text/html"):
            extra["content-security-policy"] = content_security_policy(headers.get("host", ""))
        if headers.get("if-none-match") == found.etag:
            await respond(send, 304, b"", found.media, extra)
            return
        body = b"" if scope["method"] == "HEAD" else found.body
        await respond(send, 200, body, found.media, {**extra, "content-length": str(len(found.body))})
