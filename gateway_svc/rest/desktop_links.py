"""The pure half of the live desktop viewer: viewer tokens, its routes and URLs (no sockets).

A viewer token is signed with the preview tokens' secret and code (`PreviewTokens.seal`/`open`),
its claims naming the kind (`k: "desktop"`, which no preview token has, so neither kind is accepted
as the other), tenant, instance, mode (`v`: view-only) and expiry. `gateway_svc.rest.desktop_stream`
does the I/O.

Routes (the gateway's HTTP face):

* `GET /v1/instances/{id}/desktop:stream`, a WebSocket: RFB in binary frames.
* `GET /desktop/{id}`: the viewer page; the token is in the URL's fragment (`#token=...`), which
  browsers never send, so it appears in no request line, proxy log or Referer. The page hands it
  to the WebSocket as a subprotocol.
* `GET /desktop/static/<file>`: the page's script and style, and noVNC's ES modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from gateway_svc.rest.preview_links import PreviewTokens, unauthenticated

KIND = "desktop"
DEFAULT_TTL_SECONDS = 3600
MAX_TTL_SECONDS = 7 * 24 * 3600
# WebSocket subprotocols: the token (browsers cannot set headers on a WebSocket), and the one the
# gateway selects (noVNC's own default, "binary").
TOKEN_SUBPROTOCOL = "cyberdesk.viewer."
SELECTED_SUBPROTOCOL = "binary"

_STREAM = re.compile(r"^/v1/instances/(?P<instance>[a-z0-9][a-z0-9-]{0,62})/desktop:stream$")
_PAGE = re.compile(r"^/desktop/(?P<instance>[a-z0-9][a-z0-9-]{0,62})/?$")
STATIC_PREFIX = "/desktop/static/"


@dataclass(frozen=True)
class ViewerGrant:
    """What a valid viewer token allows: the desktop of one instance of one tenant, until `expires`."""

    tenant_id: str
    instance_id: str
    view_only: bool
    expires: int  # Unix seconds


def mint(tokens: PreviewTokens, grant: ViewerGrant) -> str:
    """The token of `grant`."""
    return tokens.seal(
        {"k": KIND, "t": grant.tenant_id, "i": grant.instance_id, "v": grant.view_only, "e": grant.expires}
    )


def verify(tokens: PreviewTokens, token: str, now: float) -> ViewerGrant:
    """The grant of a valid, unexpired viewer token; UNAUTHENTICATED otherwise."""
    claims: dict[str, Any] = tokens.open(token, "viewer token")
    try:
        if claims["k"] != KIND:
            raise ValueError("another kind of token")
        grant = ViewerGrant(str(claims["t"]), str(claims["i"]), bool(claims["v"]), int(claims["e"]))
    except (KeyError, ValueError, TypeError):
        raise unauthenticated("the viewer token is not valid") from None
    if grant.expires <= now:
        raise unauthenticated("the viewer token has expired; create a new viewer URL with CreateDesktopViewerUrl")
    return grant


def match_stream(path: str) -> str | None:
    """The instance of a desktop stream's path, or None."""
    found = _STREAM.match(path)
    return found["instance"] if found else None


def match_page(path: str) -> str | None:
    """The instance of a viewer page's path, or None."""
    found = _PAGE.match(path)
    return found["instance"] if found else None


def token_from_subprotocols(offered: list[str]) -> str:
    """The viewer token a WebSocket handshake offers as a subprotocol, or ""."""
    for proto in offered:
        if proto.startswith(TOKEN_SUBPROTOCOL):
            return proto[len(TOKEN_SUBPROTOCOL) :]
    return ""


def viewer_urls(public_url: str, instance_id: str, token: str) -> tuple[str, str]:
    """(page URL with the token in its fragment, WebSocket URL of the stream)."""
    base = public_url.rstrip("/")
    page = f"{base}/desktop/{instance_id}#token={quote(token, safe='')}"
    scheme, sep, rest = base.partition("://")
    ws = {"https": "wss", "http": "ws"}.get(scheme, scheme)
    return page, f"{ws}{sep}{rest}/v1/instances/{instance_id}/desktop:stream"


__all__ = [
    "DEFAULT_TTL_SECONDS",
    "MAX_TTL_SECONDS",
    "SELECTED_SUBPROTOCOL",
    "TOKEN_SUBPROTOCOL",
    "ViewerGrant",
    "match_page",
    "match_stream",
    "mint",
    "token_from_subprotocols",
    "verify",
    "viewer_urls",
]
