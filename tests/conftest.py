"""Fixtures shared by every test: a real redis-server on a free port, requiring a password."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from cyberdesk_stack.processes import redis_server


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real redis-server started for this test session (no persistence).

    The server requires a password made for this session and the URL carries it
    (redis://:SECRET@127.0.0.1:PORT/0), as `cyberdesk up` does: every test that talks to Redis,
    directly or through a service, goes through the authenticated path.
    """
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; run `make setup`")
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
