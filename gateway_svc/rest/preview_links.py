"""The pure half of previews (no sockets): signed preview tokens, which URL names which port, header rewriting.

A preview is a TCP port inside an instance, reached through the gateway's HTTP face at
`http://<port>-<instance_id>.<preview domain>/...` (host form) or
`/v1/instances/<instance_id>/ports/<port>/...` (path form). `gateway_svc.rest.preview` does the
I/O; everything here is a plain function of its arguments, unit-tested without a server.

Tokens: `<payload>.<mac>`, both unpadded base64url; the payload is compact JSON naming the tenant,
instance, port, expiry (Unix seconds) and whether the token is public; the MAC is HMAC-SHA256 of
the payload's base64 text under the gateway's preview secret. No encryption: a token says nothing
its holder may not know (its own instance and port), and its integrity is what matters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import grpc

from cyberdesk_common.config import ConfigError
from cyberdesk_common.status import RpcError

TOKEN_HEADER = "x-cyberdesk-preview-token"
TOKEN_QUERY = "cyberdesk_preview_token"
TOKEN_COOKIE = "cyberdesk_preview_token"
MAX_TTL_SECONDS = 7 * 24 * 3600
DEFAULT_TTL_SECONDS = 3600

_HOST_LABEL = re.compile(r"^(?P<port>[0-9]{1,5})-(?P<instance>[a-z0-9][a-z0-9-]{0,62})$")
_PATH = re.compile(r"^/v1/instances/(?P<instance>[^/]+)/ports/(?P<port>[0-9]{1,5})(?P<rest>/.*)?$")

# Never sent to the service in the instance: hop-by-hop headers (RFC 9110 7.6.1; the gateway
# frames the request itself) and the proxy's own credentials.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authorization"}
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class PreviewGrant:
    """What a valid token allows: one port of one instance of one tenant, until `expires`."""

    tenant_id: str
    instance_id: str
    port: int
    expires: int  # Unix seconds
    public: bool


def unauthenticated(message: str) -> RpcError:
    """UNAUTHENTICATED (HTTP 401) with `message`."""
    return RpcError(grpc.StatusCode.UNAUTHENTICATED, message)


class PreviewTokens:
    """Mints and verifies preview tokens under one secret (constant-time MAC check)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ConfigError("the preview secret must be at least 16 bytes")
        self._secret = secret

    @classmethod
    def from_state_dir(cls, state_dir: Path, override: str = "") -> PreviewTokens:
        """`override` (CYBERDESK_PREVIEW_SECRET, shared by every replica) or `<state_dir>/gateway_preview_secret`.

        The file is created with mode 0600 on first start (O_EXCL, so two gateways starting at
        once cannot write different secrets), like the key store; deleting it revokes every token.
        """
        if override:
            return cls(override.encode("utf-8"))
        path = state_dir / "gateway_preview_secret"
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            text = path.read_text().strip()
            if len(text) < 32:
                raise ConfigError("the preview secret file is unusable; delete it to create a new one") from None
            return cls(text.encode("ascii"))
        text = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w") as out:
            out.write(text + "\n")
        return cls(text.encode("ascii"))

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode("ascii"), hashlib.sha256).digest())

    def mint(self, grant: PreviewGrant) -> str:
        """The token of `grant`."""
        return self.seal(
            {"t": grant.tenant_id, "i": grant.instance_id, "p": grant.port, "e": grant.expires, "pub": grant.public}
        )

    def seal(self, claims: dict[str, Any]) -> str:
        """A signed token of `claims` (compact JSON). Other kinds of token (the desktop viewer's,
        gateway_svc/rest/desktop_links.py) carry a `k` claim, which a preview token never has."""
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
        return f"{payload}.{self._mac(payload)}"

    def open(self, token: str, what: str = "preview token") -> dict[str, Any]:
        """The claims of a token whose MAC is valid; UNAUTHENTICATED "the <what> is not valid" otherwise."""
        payload, dot, mac = token.strip().partition(".")
        expected = self._mac(payload).encode() if dot and payload else b""
        if not expected or not hmac.compare_digest(mac.encode("ascii", "replace"), expected):
            raise unauthenticated(f"the {what} is not valid")
        try:
            claims = json.loads(_unb64(payload))
        except (ValueError, binascii.Error):
            raise unauthenticated(f"the {what} is not valid") from None
        if not isinstance(claims, dict):
            raise unauthenticated(f"the {what} is not valid")
        return claims

    def verify(self, token: str, now: float) -> PreviewGrant:
        """The grant of a valid, unexpired token; UNAUTHENTICATED otherwise (never saying more than why)."""
        body: dict[str, Any] = self.open(token)
        try:
            if "k" in body:
                raise KeyError("k")  # another kind of token
            grant = PreviewGrant(str(body["t"]), str(body["i"]), int(body["p"]), int(body["e"]), bool(body["pub"]))
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise unauthenticated("the preview token is not valid") from None
        if grant.expires <= now:
            raise unauthenticated("the preview token has expired; create a new one with CreatePreviewUrl")
        return grant


@dataclass(frozen=True)
class PreviewTarget:
    """One request's preview: which port of which instance, the target to send it, and its form."""

    instance_id: str
    port: int
    target: str  # the request target the service sees ("/index.html?x=1")
    path_prefix: str  # "" for the host form; "/v1/instances/<id>/ports/<port>" for the path form


def match_host(host: str, domain: str) -> tuple[str, int] | None:
    """(instance, port) when `host` is `<port>-<instance>.<domain>` (any port suffix), else None."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.lower().rstrip(".")
    suffix = "." + domain.lower().strip(".")
    if not name.endswith(suffix):
        return None
    found = _HOST_LABEL.match(name[: -len(suffix)])
    if found is None:
        return None
    port = int(found["port"])
    return (found["instance"], port) if 1 <= port <= 65535 else None


def match(host: str, raw_path: str, query: str, domain: str) -> PreviewTarget | None:
    """The preview a request names by its Host header or its path; None when it names none."""
    by_host = match_host(host, domain) if domain else None
    if by_host is not None:
        instance, port = by_host
        return PreviewTarget(instance, port, _with_query(raw_path or "/", query), "")
    found = _PATH.match(raw_path)
    if found is None:
        return None
    port = int(found["port"])
    if not 1 <= port <= 65535:
        return None
    prefix = raw_path[: len(raw_path) - len(found["rest"] or "")]
    return PreviewTarget(found["instance"], port, _with_query(found["rest"] or "/", query), prefix)


def _with_query(path: str, query: str) -> str:
    return f"{path}?{query}" if query else path


def split_token_query(query: str) -> tuple[str, str]:
    """(token from the query or "", the query without it), other parameters kept byte for byte."""
    if TOKEN_QUERY not in query:
        return "", query
    token = ""
    kept: list[str] = []
    for part in query.split("&"):
        name = part.split("=", 1)[0]
        if name == TOKEN_QUERY:
            token = dict(parse_qsl(part)).get(TOKEN_QUERY, "")
        else:
            kept.append(part)
    return token, "&".join(kept)


def cookie_token(cookie_header: str) -> tuple[str, str]:
    """(the preview token cookie or "", the Cookie header without it)."""
    token = ""
    kept: list[str] = []
    for part in cookie_header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == TOKEN_COOKIE:
            token = value
        elif part.strip():
            kept.append(part.strip())
    return token, "; ".join(kept)


def upstream_headers(
    headers: list[tuple[bytes, bytes]],
    port: int,
    *,
    drop: frozenset[str],
    cookie: str | None,
    forwarded: dict[str, str],
) -> list[tuple[bytes, bytes]]:
    """The request headers the service sees.

    Host becomes `localhost:<port>` (dev servers check Host against their own name) and the
    original goes in `X-Forwarded-Host`; hop-by-hop headers and those in `drop` (the credentials
    the gateway consumed) are removed; `cookie` replaces the Cookie header (None: unchanged).
    """
    out: list[tuple[bytes, bytes]] = [(b"host", f"localhost:{port}".encode())]
    for name, value in headers:
        lower = name.decode("latin-1").lower()
        if lower in HOP_BY_HOP or lower in drop or lower == "host" or lower.startswith("x-forwarded-"):
            continue
        if lower == "cookie" and cookie is not None:
            continue
        out.append((name, value))
    if cookie:
        out.append((b"cookie", cookie.encode("latin-1")))
    out += [(k.encode(), v.encode("latin-1")) for k, v in forwarded.items() if v]
    return out


def preview_urls(public_url: str, domain: str, instance_id: str, port: int, token: str | None) -> tuple[str, str]:
    """(host-form URL, path-form URL) of a port; `token` (a public one) goes in their query."""
    scheme, _, rest = public_url.partition("://")
    origin = rest.split("/", 1)[0]
    host_port = origin.rsplit(":", 1)[1] if ":" in origin and not origin.endswith("]") else ""
    default = {"http": "80", "https": "443"}.get(scheme, "")
    suffix = f":{host_port}" if host_port and host_port != default else ""
    query = "?" + urlencode({TOKEN_QUERY: token}) if token else ""
    host_url = f"{scheme}://{port}-{instance_id}.{domain}{suffix}/{query}"
    path_url = f"{public_url.rstrip('/')}/v1/instances/{instance_id}/ports/{port}/{query}"
    return host_url, path_url
