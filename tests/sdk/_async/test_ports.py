"""`instance.ports` against a real stack: a server inside a sandbox, reached by the URLs the SDK returns.

Written for the async client; tools/unasync.py generates the sync twin (tests/sdk/_sync/test_ports.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest

from cyberdesk import AsyncCyberdesk, AsyncInstance, InvalidArgument, NotFound
from tests.cli.stack import RunningStack

PORT = 3000
# Waits (inside the sandbox, so the test itself never polls) until the server accepts connections.
WAIT_FOR_PORT = (
    f"for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/{PORT}) 2>/dev/null && exit 0; sleep 0.1; done; exit 1"
)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Module-scoped, so the module's client and instance live in one event loop."""
    return "asyncio"


@pytest.fixture(scope="module")
async def client(stack: RunningStack) -> AsyncIterator[AsyncCyberdesk]:
    key = stack.env_config()["api_key"]
    async with AsyncCyberdesk(api_key=key, endpoint=stack.gateway) as made:
        yield made


@pytest.fixture(scope="module")
async def box(client: AsyncCyberdesk) -> AsyncIterator[AsyncInstance]:
    made = await client.instances.create(timeout=600, labels={"suite": "sdk-ports"})
    async with made:
        await made.files.write("/tmp/www/index.html", "<h1>inside</h1>")
        await made.start(f"cd /tmp/www && exec python3 -m http.server {PORT} --bind 127.0.0.1")
        assert (await made.exec(WAIT_FOR_PORT)).exit_code == 0
        yield made


def _direct(url: str) -> tuple[str, dict[str, str]]:
    """The URL with its host replaced by 127.0.0.1 and the Host header it named (no wildcard DNS here)."""
    parts = urlsplit(url)
    return url.replace(parts.netloc, f"127.0.0.1:{parts.port}", 1), {"host": parts.netloc}


@pytest.mark.anyio
async def test_urls_of_a_port(stack: RunningStack, box: AsyncInstance) -> None:
    key = stack.env_config()["api_key"]
    host_url = await box.ports.url(PORT)
    assert host_url.startswith(f"http://{PORT}-{box.id}.localhost:") and host_url.endswith("/")
    path_url = await box.ports.url(PORT, path_form=True)
    assert path_url.endswith(f"/v1/instances/{box.id}/ports/{PORT}/")
    signed = await box.ports.url(PORT, signed=True, path_form=True, ttl=60)
    assert "cyberdesk_preview_token=" in signed
    async with httpx.AsyncClient(timeout=30) as http:
        # Unsigned: the API key opens it; without the key it is 401.
        assert (await http.get(path_url)).status_code == 401
        r = await http.get(path_url, headers={"x-api-key": key})
        assert r.status_code == 200 and r.text == "<h1>inside</h1>"
        url, headers = _direct(host_url)
        r = await http.get(url, headers={**headers, "x-api-key": key})
        assert r.status_code == 200 and r.text == "<h1>inside</h1>"
        # Signed: the URL alone.
        r = await http.get(signed)
        assert r.status_code == 200 and r.text == "<h1>inside</h1>"
    link = await box.ports.link(PORT, ttl=60)
    assert link.token and not link.public and link.expire_time is not None


@pytest.mark.anyio
async def test_refusals(client: AsyncCyberdesk, box: AsyncInstance) -> None:
    with pytest.raises(InvalidArgument):
        await box.ports.url(0)
    with pytest.raises(NotFound):
        await client.instances.handle("i-000000000000").ports.url(PORT)
