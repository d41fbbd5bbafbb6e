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

import json
import re
from pathlib import Path

import grpc

from gateway_svc.rest import http_errors
from gateway_svc.rest.asgi import Scope, Send, request_headers, respond_error
from gateway_svc.rest.desktop_links import STATIC_PREFIX, match_page
from gateway_svc.rest.static_files import IMMUTABLE, REVALIDATE, StaticFile, send_file, static_file, websocket_sources

ROOT = Path(__file__).resolve().parents[2]
PAGE_DIR = Path(__file__).resolve().parent / "desktop_viewer"
DEFAULT_NOVNC = ROOT / "web" / "node_modules" / "@novnc" / "novnc"
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
_NOVNC_FILE = re.compile(r"^(core|vendor)/[A-Za-z0-9_./-]+\.js$")


def content_security_policy(host: str) -> str:
    """The viewer page's CSP; `host` (the request's Host, checked) names the stream's WebSocket origins."""
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data: blob:",
            f"connect-src 'self'{websocket_sources(host)}",
            "base-uri 'none'",
            "form-action 'none'",
            "object-src 'none'",
            "frame-ancestors 'self'",
        ]
    )


class DesktopPages:
    """The viewer page and its files; noVNC is read from `novnc_dir` (web/node_modules by default)."""

    def __init__(self, novnc_dir: Path = DEFAULT_NOVNC) -> None:
        self.novnc_dir = novnc_dir
        self._files: dict[str, StaticFile] | None = None
        self._version = ""

    def matches(self, method: str, path: str) -> bool:
        """Whether the request is for the viewer page or its files."""
        return method in ("GET", "HEAD") and (path.startswith(STATIC_PREFIX) or match_page(path) is not None)

    def _load(self) -> dict[str, StaticFile]:
        if self._files is None:
            meta = json.loads((self.novnc_dir / "package.json").read_text())
            self._version = str(meta["version"])
            novnc = f"{STATIC_PREFIX}novnc/{self._version}"
            script = (PAGE_DIR / "viewer.js").read_text().replace("__NOVNC__", novnc).encode()
            css = (PAGE_DIR / "viewer.css").read_bytes()
            self._files = {
                "page": static_file((PAGE_DIR / "viewer.html").read_bytes(), "text/html; charset=utf-8", REVALIDATE),
                f"{STATIC_PREFIX}viewer.js": static_file(script, _TYPES[".js"], REVALIDATE),
                f"{STATIC_PREFIX}viewer.css": static_file(css, _TYPES[".css"], REVALIDATE),
            }
        return self._files

    def _novnc(self, path: str) -> StaticFile | None:
        prefix = f"{STATIC_PREFIX}novnc/{self._version}/"
        if not path.startswith(prefix):
            return None
        rel = path[len(prefix) :]
        if not _NOVNC_FILE.match(rel) or ".." in rel.split("/"):
            return None
        file = (self.novnc_dir / rel).resolve()
        if not file.is_relative_to(self.novnc_dir.resolve()) or not file.is_file():
            return None
        found = static_file(file.read_bytes(), _TYPES[".js"], IMMUTABLE)
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
        extra = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}
        if found.media.startswith("text/html"):
            extra["content-security-policy"] = content_security_policy(request_headers(scope).get("host", ""))
        await send_file(send, scope, found, extra)
