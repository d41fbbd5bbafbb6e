"""Fixtures of the fault tests: `cyberdesk up` stacks (tests/faults/up.py) that are always stopped and swept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from cyberdesk_stack.launcher import sweep_sandboxes
from tests.faults.up import Up


class StartUp(Protocol):
    """The `start_up` fixture: start an `Up` (see Up for the arguments)."""

    def __call__(self, state_dir: Path, *, on_exit: str | None = None, ports: dict[str, int] | None = None) -> Up: ...


@pytest.fixture(scope="module")
def start_up() -> Iterator[StartUp]:
    """Start `cyberdesk up`s for a module; at its end every one is stopped and no sandbox of theirs runs.

    A state directory must have a short path (e.g. `tmp_path_factory.mktemp("up")`, not `tmp_path`,
    which adds the test's name): the sandboxes' agent sockets live under it, and a unix socket's
    path has at most 107 bytes.
    """
    started: list[Up] = []

    def start(state_dir: Path, *, on_exit: str | None = None, ports: dict[str, int] | None = None) -> Up:
        up = Up(state_dir, on_exit=on_exit, ports=ports)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()
    for state_dir in {up.state_dir for up in started}:
        sweep_sandboxes(state_dir)  # what a `keep` stop, a killed `up` or a failed test left behind
