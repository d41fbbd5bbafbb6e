"""One `cyberdesk up` stack for all the SDK's end-to-end tests, async and sync (the unit tests need none)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cli.stack import RunningStack, running_stack


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A running stack whose CLI config the SDK finds through CYBERDESK_CONFIG."""
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture
def sdk_env(stack: RunningStack, monkeypatch: pytest.MonkeyPatch) -> RunningStack:
    """Point this process's SDK at the stack, as `cyberdesk up` points a user's."""
    monkeypatch.setenv("CYBERDESK_CONFIG", str(stack.config))
    for name in ("CYBERDESK_API_KEY", "CYBERDESK_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return stack
