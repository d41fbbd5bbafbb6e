"""A running stack for the gateway tests: the real gateway, real guest agents (`python -m guest_agent`,
one per routed instance, each bound to its instance id), and the routing stand-in instance_svc.testing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from cyberdesk_stack.processes import AgentProcess, guest_agent
from tests.support.procs import ROOT, Service, free_port, service

INTERNAL_TOKEN = "internal-" + "i" * 40
AGENT_TOKEN = "agent-" + "a" * 40


@dataclass
class Stack:
    """Where everything listens, and how to change the world behind the gateway."""

    tmp: Path
    state: Path
    gateway: str
    routes_path: Path
    redis_url: str
    routes: dict[str, dict[str, str]] = field(default_factory=dict)
    agents: dict[str, Service] = field(default_factory=dict)

    def set_route(self, instance_id: str, tenant: str, state: str, target: str) -> None:
        self.routes[instance_id] = {"tenant": tenant, "state": state, "target": target, "token": AGENT_TOKEN}
        self.routes_path.write_text(json.dumps(self.routes))

    def cli(self, *args: str) -> str:
        """Run `python -m gateway_svc keys ...` against this stack's state dir; returns stdout."""
        out = subprocess.run(
            [sys.executable, "-m", "gateway_svc", "keys", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "CYBERDESK_STATE_DIR": str(self.state)},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    def new_key(self, tenant: str, admin: bool = False, rate_limit: str | None = None) -> str:
        args = ["create", "--tenant", tenant, "--name", "test"]
        if admin:
            args.append("--admin")
        if rate_limit:
            args += ["--rate-limit", rate_limit]
        line = next(line for line in self.cli(*args).splitlines() if line.startswith("secret"))
        return line.split()[1]


@contextmanager
def agent(tmp: Path, instance_id: str) -> Iterator[AgentProcess]:
    """A real guest agent (`python -m guest_agent`) bound to `instance_id`, on its own unix socket.

    It runs on this host, so the pids it reports are real pids here (the launcher gives it a fresh
    HOME and an empty DISPLAY: no desktop in these tests)."""
    with guest_agent(
        tmp / instance_id, instance_id, token=AGENT_TOKEN, env={"CYBERDESK_AGENT_GRACE_SECONDS": "1"}
    ) as running:
        yield running


def gateway_env(stack_state: Path, instance_addr: str, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "CYBERDESK_STATE_DIR": str(stack_state),
        "CYBERDESK_INSTANCE_ADDR": instance_addr,
        "CYBERDESK_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "CYBERDESK_REDIS_URL": redis_url,
        "CYBERDESK_RATE_LIMIT": "1000/1s",
        "CYBERDESK_AUTH_CACHE_SECONDS": "1",
        # The REST face listens too (default 127.0.0.1:8080): a free port, so stacks never clash.
        "CYBERDESK_GATEWAY_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        **extra,
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("gw")
    state = tmp / "state"
    routes_path = tmp / "routes.json"
    routes_path.write_text("{}")
    instance_addr = f"127.0.0.1:{free_port()}"
    gw_addr = f"127.0.0.1:{free_port()}"
    with ExitStack() as stack_ctx:
        stack_ctx.enter_context(
            service(
                "instance_svc.testing",
                instance_addr,
                {
                    "UPSTREAM_ADDR": instance_addr,
                    "UPSTREAM_ROUTES": str(routes_path),
                    "CYBERDESK_INTERNAL_TOKEN": INTERNAL_TOKEN,
                },
                tmp,
            )
        )
        stack_ctx.enter_context(
            service(
                "gateway_svc",
                gw_addr,
                gateway_env(state, instance_addr, redis_url, CYBERDESK_GATEWAY_ADDR=gw_addr),
                tmp,
            )
        )
        st = Stack(tmp, state, gw_addr, routes_path, redis_url)
        st.instance_addr = instance_addr  # type: ignore[attr-defined]
        # Each routed instance has its own agent, bound to its id: an agent answers NOT_FOUND for
        # any other instance, so a request the gateway routed wrongly cannot pass by accident.
        for instance_id, tenant, state_name in (
            ("i-a", "tenant-a", "RUNNING"),
            ("i-paused", "tenant-a", "PAUSED"),
            ("i-b", "tenant-b", "RUNNING"),
            ("i-life", "tenant-a", "RUNNING"),
        ):
            st.agents[instance_id] = stack_ctx.enter_context(agent(tmp / "agents", instance_id))
            st.set_route(instance_id, tenant, state_name, st.agents[instance_id].target)
        yield st


@pytest.fixture
def channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.gateway) as ch:
        yield ch
