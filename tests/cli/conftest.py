"""One `cyberdesk up` stack for the CLI tests of this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cli.stack import RunningStack, running_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A running stack; the CLI config it wrote is the one `stack.cli(...)` uses."""
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running
