"""A running stack for the REST face: real redis, real instance_svc (local runtime, real sandboxes), the gateway.

The gateway is the real process (`python -m gateway_svc`), serving gRPC and HTTP; instance_svc is
started by the helper of its own tests (tests/instance_svc/conftest.py), so its sandboxes are
cleaned up the same way. Fixtures here are named `rest_*` so they never shadow the gRPC tests'
`stack` and `channel` fixtures of tests/gateway_svc/conftest.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.instance_svc.conftest import TOKEN as INTERNAL_TOKEN
from tests.instance_svc.conftest import running
from tests.support.procs import ROOT, Service, free_port, service

TENANT = "tenant-rest"
OTHER_TENANT = "tenant-other"


@dataclass
class RestStack:
    """Where the gateway listens, its keys, and a client factory."""

    tmp: Path
    state: Path
    grpc_addr: str
    http_addr: str
    instance_addr: str
    redis_url: str
    gateway: Service
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{self.http_addr}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.http_addr}"

    def client(self, key: str | None = "main", **kw: Any) -> httpx.Client:
        """An httpx client sending the named key (None: no key)."""
        headers = {"authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kw)

    def new_key(self, tenant: str, rate_limit: str | None = None) -> str:
        """A key made with `python -m gateway_svc keys create` on the gateway's state dir."""
        args = ["create", "--tenant", tenant, "--name", "rest-test"]
        if rate_limit:
            args += ["--rate-limit", rate_limit]
        out = subprocess.run(
            [sys.executable, "-m", "gateway_svc", "keys", *args],
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CYBERDESK_STATE_DIR": str(self.state)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return next(line.split()[1] for line in out.splitlines() if line.startswith("secret"))


def wait_http(base_url: str, svc: Service, timeout: float = 20.0) -> None:
    """Block until the REST face answers /openapi.json."""
    deadline = time.monotonic() + timeout
    while True:
        if svc.proc.poll() is not None:
            raise RuntimeError(f"the gateway exited: {svc.log()[-2000:]}")
        try:
            if httpx.get(f"{base_url}/openapi.json", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"REST face at {base_url} did not answer: {svc.log()[-2000:]}")
        time.sleep(0.05)


@contextmanager
def gateway_process(tmp: Path, state: Path, instance_addr: str, redis_url: str, **extra: str) -> Iterator[Service]:
    """Run the gateway until the generator is closed; yields once it serves both faces."""
    grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        "CYBERDESK_STATE_DIR": str(state),
        "CYBERDESK_INSTANCE_ADDR": instance_addr,
        "CYBERDESK_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "CYBERDESK_REDIS_URL": redis_url,
        "CYBERDESK_RATE_LIMIT": "1000/1s",
        "CYBERDESK_GATEWAY_ADDR": grpc_addr,
        "CYBERDESK_GATEWAY_HTTP_ADDR": http_addr,
        **extra,
    }
    tmp.mkdir(parents=True, exist_ok=True)
    with service("gateway_svc", grpc_addr, env, tmp) as svc:
        svc.http_addr = http_addr  # type: ignore[attr-defined]
        wait_http(f"http://{http_addr}", svc)
        yield svc


@pytest.fixture(scope="session")
def rest_stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[RestStack]:
    tmp = tmp_path_factory.mktemp("rest")
    state = tmp / "gw-state"
    with ExitStack() as ctx:
        svc = ctx.enter_context(running(tmp, redis_url))
        # billing_svc too: the REST face serves its routes (GET /v1/usage, /v1/plan), which would
        # otherwise answer 503, and the schemathesis run checks every route for server errors.
        billing_addr = f"127.0.0.1:{free_port()}"
        (tmp / "billing").mkdir()
        billing_env = {
            "CYBERDESK_STATE_DIR": str(tmp / "billing"),
            "CYBERDESK_BILLING_ADDR": billing_addr,
            "CYBERDESK_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "CYBERDESK_INSTANCE_ADDR": svc.target,
            "CYBERDESK_REDIS_URL": redis_url,
        }
        ctx.enter_context(service("billing_svc", billing_addr, billing_env, tmp / "billing"))
        gateway = ctx.enter_context(
            gateway_process(tmp / "gw", state, svc.target, redis_url, CYBERDESK_BILLING_ADDR=billing_addr)
        )
        st = RestStack(tmp, state, gateway.target, gateway.http_addr, svc.target, redis_url, gateway)  # type: ignore[attr-defined]
        st.keys["main"] = st.new_key(TENANT)
        st.keys["other"] = st.new_key(OTHER_TENANT)
        yield st


@pytest.fixture(scope="session")
def rest_instance(rest_stack: RestStack) -> Iterator[str]:
    """A running base instance of TENANT, created through REST; deleted at the end."""
    with rest_stack.client() as client:
        # A session-long instance: with the suite in two processes its files may run far apart, so it
        # must outlive the default 300 s lifetime.
        r = client.post("/v1/instances", json={"labels": {"suite": "rest"}, "timeout": "7200s"})
        assert r.status_code == 200, r.text
        instance = r.json()["instance"]
        assert instance["state"] == "INSTANCE_STATE_RUNNING", instance
        yield instance["instanceId"]
        client.delete(f"/v1/instances/{instance['instanceId']}")
