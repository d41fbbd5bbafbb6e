"""CORS of the REST face against a real gateway started with CYBERDESK_CORS_ORIGINS (and one without it).

The headers are what a browser decides on; tests/sdk_typescript/test_browser.py has a real browser
act on them. Here: the preflight's answer, the headers on actual answers (errors, streams and
downloads included), a refused origin, the WebSocket handshake's Origin check, and the default
(no setting: no CORS header at all).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.gateway_svc.rest.e2e.conftest import RestStack, gateway_process

ALLOWED = "http://127.0.0.1:5173"
OTHER = "http://evil.test"


@pytest.fixture(scope="module")
def cors_gateway(rest_stack: RestStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second gateway over the same key store and instance_svc, allowing ALLOWED; its HTTP address."""
    tmp: Path = tmp_path_factory.mktemp("cors-gw")
    extra = {"CYBERDESK_CORS_ORIGINS": f"{ALLOWED}/, https://app.example.com"}  # a trailing slash is forgiven
    with gateway_process(tmp, rest_stack.state, rest_stack.instance_addr, rest_stack.redis_url, **extra) as gw:
        yield gw.http_addr  # type: ignore[attr-defined]


def _preflight(base: str, origin: str, method: str = "POST") -> httpx.Response:
    return httpx.options(
        f"{base}/v1/instances",
        headers={
            "origin": origin,
            "access-control-request-method": method,
            "access-control-request-headers": "authorization, content-type",
        },
        timeout=30,
    )


def test_preflight_of_an_allowed_origin(cors_gateway: str) -> None:
    r = _preflight(f"http://{cors_gateway}", ALLOWED)
    assert r.status_code == 204, r.text
    assert r.headers["access-control-allow-origin"] == ALLOWED
    methods = {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}
    assert {"GET", "POST", "PUT", "DELETE", "HEAD"} <= methods
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "range"} <= allowed
    assert "access-control-allow-credentials" not in r.headers
    assert r.headers["vary"] == "origin"


def test_preflight_of_another_origin_is_refused(cors_gateway: str) -> None:
    r = _preflight(f"http://{cors_gateway}", OTHER)
    assert r.status_code == 403
    assert not any(h.startswith("access-control-") for h in r.headers)
    assert "not allowed" in r.json()["message"]


def test_answers_to_an_allowed_origin_are_readable(
    cors_gateway: str, rest_stack: RestStack, rest_instance: str
) -> None:
    base = f"http://{cors_gateway}"
    key = {"authorization": f"Bearer {rest_stack.keys['main']}"}
    with httpx.Client(base_url=base, headers={**key, "origin": ALLOWED}, timeout=60) as client:
        ok = client.get(f"/v1/instances/{rest_instance}")
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == ALLOWED
        exposed = {h.strip() for h in ok.headers["access-control-expose-headers"].split(",")}
        assert {"retry-after", "content-range", "x-cyberdesk-sha256", "cyberdesk-watch-cursor"} <= exposed
        # Errors too: a page must be able to read the Status body of a 404.
        missing = client.get("/v1/instances/i-000000000000")
        assert missing.status_code == 404 and missing.headers["access-control-allow-origin"] == ALLOWED
        # A stream and a ranged download.
        with client.stream("POST", f"/v1/instances/{rest_instance}/processes", json={"command": "echo hi"}) as s:
            assert s.status_code == 200 and s.headers["access-control-allow-origin"] == ALLOWED
            s.read()
        put = client.put(f"/v1/instances/{rest_instance}/files/tmp/cors.txt?overwrite=true", content=b"cors")
        assert put.status_code == 200, put.text
        got = client.get(f"/v1/instances/{rest_instance}/files/tmp/cors.txt", headers={"range": "bytes=1-"})
        assert got.status_code == 206 and got.content == b"ors"
        assert got.headers["access-control-allow-origin"] == ALLOWED
    # Another origin's answer carries no CORS header (the browser then hides it from the page).
    other = httpx.get(f"{base}/v1/instances/{rest_instance}", headers={**key, "origin": OTHER}, timeout=30)
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_no_setting_no_cors_headers(rest_stack: RestStack) -> None:
    # The session's gateway has no CYBERDESK_CORS_ORIGINS.
    assert _preflight(rest_stack.base_url, ALLOWED).status_code == 403
    r = httpx.get(f"{rest_stack.base_url}/openapi.json", headers={"origin": ALLOWED}, timeout=30)
    assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)


def test_websocket_shell_checks_the_origin(cors_gateway: str, rest_stack: RestStack, rest_instance: str) -> None:
    url = f"ws://{cors_gateway}/v1/instances/{rest_instance}/pty"
    # As a browser does it: the key as a subprotocol, the page's Origin.
    protocols = ["cyberdesk.v1", f"cyberdesk.key.{rest_stack.keys['main']}"]

    async def shell(origin: str | None) -> str:
        async with websockets.connect(url, subprotocols=protocols, origin=origin) as ws:  # type: ignore[arg-type]
            await ws.send(json.dumps({"type": "open", "cols": 80, "rows": 24, "argv": ["/bin/echo", "from-ws"]}))
            seen = b""
            async for frame in ws:
                if isinstance(frame, bytes):
                    seen += frame
            return seen.decode()

    assert "from-ws" in asyncio.run(shell(ALLOWED))
    assert "from-ws" in asyncio.run(shell(None))  # not a browser
    assert "from-ws" in asyncio.run(shell(f"http://{cors_gateway}"))  # the gateway's own origin
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(shell(OTHER))
    assert refused.value.response.status_code == 403
    assert b"not allowed" in refused.value.response.body
