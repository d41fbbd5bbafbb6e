"""Fixtures of the fault tests: `cyberdesk up` stacks (tests/faults/up.py) that are always stopped and swept,
and a killable stack of separate processes (tests/faults/stack.py) per module, with a key of the
module's `TENANT` and an instance of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from cyberdesk import Cyberdesk, Instance
from cyberdesk_stack.launcher import sweep_sandboxes
from tests.faults.stack import Stack, fault_stack
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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """Redis, instance_svc and the gateway as separate processes (each killable) for one module."""
    # A short directory name: the sandboxes' unix sockets live below it (107-byte limit).
    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")[:8]
    with fault_stack(tmp_path_factory.mktemp(name)) as running:
        yield running


@pytest.fixture(scope="module")
def key(stack: Stack, request: pytest.FixtureRequest) -> str:
    """An API key of the module's tenant (its `TENANT`)."""
    return stack.gateway.new_key(request.module.TENANT)[1]


@pytest.fixture(scope="module")
def box(stack: Stack, key: str) -> Iterator[Instance]:
    """One instance of the module's tenant, deleted at the module's end."""
    with Cyberdesk(api_key=key, endpoint=stack.gateway.addr, timeout=60) as client:
        instance = client.instances.create(timeout=600)
        try:
            yield instance
        finally:
            instance.delete()
