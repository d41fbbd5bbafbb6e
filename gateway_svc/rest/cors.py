"""CORS of the REST face: which browser origins may call the API, the preflight answer, and the Origin check of shells.

The setting is CYBERDESK_CORS_ORIGINS: origins separated by commas
(`https://app.example.com,http://localhost:5173`), or `*` for every origin. The default is none: no
CORS header is ever sent, so a page on another origin cannot read any answer (its browser refuses),
and a WebSocket handshake from another origin is refused here (403).

Why `*` is acceptable: the API's credential is an API key in the Authorization header (or, for a
WebSocket, a subprotocol), never a cookie, so a browser never attaches it on its own; a page that
holds a key can do whatever the key can, CORS or not. `*` is sent as the literal `*`, never with
Access-Control-Allow-Credentials (browsers ignore credentials with `*`, and there are none to allow).

WebSockets are outside CORS: a browser opens one to any origin and only reports the page's Origin.
So the PTY handshake checks that Origin itself (`websocket_allowed`): a handshake without Origin
is not a browser's and passes; one from the gateway's own origin passes (a page served there is
same-origin, which CORS would not restrict either); any other must be an allowed origin.

Previews are left alone: a preview host or path belongs to the app inside the instance, which
answers its own CORS (app.py matches previews before this is consulted).

Pure functions of headers; the app applies them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

# The methods the API's bindings use (google.api.http: get, post, put, delete; HEAD for digests).
ALLOWED_METHODS = "GET, HEAD, POST, PUT, DELETE"
# The request headers the SDKs send: the key, JSON and NDJSON bodies, ranged downloads.
ALLOWED_HEADERS = "authorization, x-api-key, content-type, accept, range"
# Response headers a page must be able to read (browsers expose only the CORS-safelisted ones):
# the rate limit's Retry-After, a download's range, size and sha256, a watch's cursor.
EXPOSED_HEADERS = (
    "retry-after, content-range, content-length, accept-ranges, x-cyberdesk-sha256, cyberdesk-watch-cursor, allow"
)
# Browsers cap it lower (Chromium: 2 h); 10 minutes keeps a changed setting from lingering long.
MAX_AGE_SECONDS = 600


def normalize_origin(value: str) -> str:
    """An origin as browsers send it (`scheme://host[:port]`, lower case); ValueError for anything else."""
    text = value.strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query or parts.fragment:
        raise ValueError(f"{value!r} is not an origin like https://app.example.com or http://localhost:5173")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{value!r} has a bad port") from None
    default = 80 if parts.scheme == "http" else 443
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


@dataclass(frozen=True)
class CorsPolicy:
    """The allowed origins: a set of them, or every origin (`*`); the default allows none."""

    origins: frozenset[str] = frozenset()
    any_origin: bool = False

    @classmethod
    def parse(cls, setting: str) -> CorsPolicy:
        """CYBERDESK_CORS_ORIGINS: "" (none), "*", or comma-separated origins; ValueError naming a bad one."""
        entries = [e.strip() for e in setting.split(",") if e.strip()]
        if "*" in entries:
            if len(entries) > 1:
                raise ValueError("'*' allows every origin: give it alone, not among other origins")
            return cls(any_origin=True)
        return cls(origins=frozenset(normalize_origin(e) for e in entries))

    @property
    def enabled(self) -> bool:
        """Whether any origin is allowed."""
        return self.any_origin or bool(self.origins)

    def allow_origin(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for a request's Origin, or None (not allowed)."""
        if not origin:
            return None
        if self.any_origin:
            return "*"
        try:
            return origin if normalize_origin(origin) in self.origins else None
        except ValueError:
            return None  # "null" (a sandboxed page, a file:) and other non-origins

    def response_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        """Headers for an actual (non-preflight) response to `origin`; none when it is not allowed."""
        allowed = self.allow_origin(origin)
        if allowed is None:
            return self._vary()
        return [
            (b"access-control-allow-origin", allowed.encode("latin-1")),
            (b"access-control-expose-headers", EXPOSED_HEADERS.encode()),
            *self._vary(),
        ]

    def preflight_headers(self, origin: str | None) -> list[tuple[bytes, bytes]] | None:
        """The headers of a preflight's 204 for `origin`, or None when it is not allowed."""
        allowed = self.allow_origin(origin)
        if allowed is None:
            return None
        return [
            (b"access-control-allow-origin", allowed.encode("latin-1")),
            (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
            (b"access-control-allow-headers", ALLOWED_HEADERS.encode()),
            (b"access-control-max-age", str(MAX_AGE_SECONDS).encode()),
            *self._vary(),
        ]

    def _vary(self) -> list[tuple[bytes, bytes]]:
        # The answer depends on Origin unless every origin gets the same `*`: caches must know.
        return [] if self.any_origin or not self.origins else [(b"vary", b"origin")]

    def websocket_allowed(self, headers: Mapping[str, str], scheme: str) -> bool:
        """Whether a WebSocket handshake may proceed, by its Origin (see the module's docstring)."""
        origin = headers.get("origin")
        if not origin:
            return True
        if self.allow_origin(origin) is not None:
            return True
        http_scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        host = headers.get("host", "")
        try:
            return bool(host) and normalize_origin(origin) == normalize_origin(f"{http_scheme}://{host}")
        except ValueError:
            return False


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    """A CORS preflight: OPTIONS with Origin and Access-Control-Request-Method."""
    return method == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers
