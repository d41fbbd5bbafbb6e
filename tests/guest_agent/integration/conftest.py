"""Fixtures for the guest agent's tests: a real agent process on a unix socket, bound to an instance."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.support.procs import Service, service

AGENT_TOKEN = "agent-token-" + "t" * 20
INSTANCE_ID = "i-agent-test"


@dataclass
class RunningAgent:
    """An agent process and an authenticated channel to it."""

    service: Service
    channel: grpc.Channel
    instance_id: str = INSTANCE_ID
    metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {AGENT_TOKEN}"),)


@contextmanager
def running_agent(tmp: Path, env: dict[str, str] | None = None) -> Iterator[RunningAgent]:
    """Run `python -m guest_agent` bound to INSTANCE_ID, with `env` on top of the test's environment."""
    target = f"unix://{tmp / 'agent.sock'}"
    # A home of its own, as in an instance: commands run in a login bash, and this machine's
    # /root/.bashrc runs `pyenv init`, whose rehash waits up to a minute on a lock that a killed
    # login shell can leave behind (a whole group of bare-agent tests once hung on it).
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    full_env = {
        "HOME": str(home),
        "CYBERDESK_AGENT_LISTEN": target,
        "CYBERDESK_AGENT_TOKEN": AGENT_TOKEN,
        "CYBERDESK_AGENT_INSTANCE_ID": INSTANCE_ID,
        **(env or {}),
    }
    with service("guest_agent", target, full_env, tmp) as svc, grpc.insecure_channel(target) as channel:
        yield RunningAgent(svc, channel)


@pytest.fixture
def bound_agent(tmp_path: Path) -> Iterator[RunningAgent]:
    """An agent serving INSTANCE_ID (no desktop)."""
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    with running_agent(agent_dir, {"DISPLAY": ""}) as agent:
        yield agent
