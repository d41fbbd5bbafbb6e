"""A real stack for the fault tests: a Redis that can be killed and restarted on its own data,
instance_svc with real sandboxes, and the gateway in front; each can be killed and started again.

The Redis keeps an append-only file (`appendonly yes`), so a kill -9 and a start on the same port
and directory bring the event stream back as it was, which is what a production Redis with
persistence does and what a watcher's cursor relies on.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cyberdesk_stack.processes import redis_argv, redis_url, spawn, stop, wait_redis
from tests.instance_svc.conftest import TOKEN, Svc, running
from tests.support.procs import ROOT, free_port, wait_healthy

# Quotas that let one tenant hold the fault tests' parallel creates (sandbox disks are sparse).
ROOMY_QUOTAS = {
    "quota_instances": "100",
    "quota_vcpus": "200",
    "quota_memory_mib": "100000",
    "quota_disk_mib": "1000000",
}


@dataclass
class Redis:
    """A persistent redis-server on a fixed port and directory, restartable."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return redis_url(self.port, self.password)

    def start(self) -> None:
        self.proc = spawn(
            redis_argv(self.port, self.data_dir, self.password, persist=True), None, self.data_dir / "redis.log"
        )
        wait_redis(self.url, self.proc)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@dataclass
class Gateway:
    """The gateway process (gRPC and REST faces); `restart` keeps its key store."""

    tmp: Path
    env: dict[str, str]
    addr: str
    http: str
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        self.proc = spawn([sys.executable, "-m", "gateway_svc"], self.env, self.tmp / f"gateway.{self.starts}.log")
        wait_healthy(self.addr, timeout=30, proc=self.proc)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("gateway.*.log")))

    def keys(self, *args: str) -> str:
        """`python -m gateway_svc keys ARGS` on this gateway's state directory, as an operator runs it."""
        out = subprocess.run(
            [sys.executable, "-m", "gateway_svc", "keys", *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "CYBERDESK_STATE_DIR": self.env["CYBERDESK_STATE_DIR"]},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    def new_key(self, tenant: str, *, admin: bool = False) -> tuple[str, str]:
        """(key id, secret) of a new key of `tenant`."""
        out = self.keys("create", "--tenant", tenant, "--name", "fault-test", *(["--admin"] if admin else []))
        fields = dict(line.split(None, 1) for line in out.splitlines() if line.startswith(("key_id", "secret")))
        return fields["key_id"].strip(), fields["secret"].strip()


@dataclass
class Stack:
    redis: Redis
    instances: Svc
    gateway: Gateway


@contextmanager
def fault_stack(tmp: Path, **gateway_env: str) -> Iterator[Stack]:
    """Redis (persistent), instance_svc (real sandboxes) and the gateway, stopped in reverse order."""
    with ExitStack() as cleanup:
        (tmp / "redis").mkdir()
        redis = Redis(tmp / "redis")
        redis.start()
        cleanup.callback(redis.stop)
        # Room for 20 parallel creates per tenant (the default quota is 10 instances).
        svc = cleanup.enter_context(running(tmp, redis.url, **ROOMY_QUOTAS))
        env = {
            "CYBERDESK_STATE_DIR": str(tmp / "gateway-state"),
            "CYBERDESK_INSTANCE_ADDR": svc.target,
            "CYBERDESK_INTERNAL_TOKEN": TOKEN,
            "CYBERDESK_REDIS_URL": redis.url,
            "CYBERDESK_RATE_LIMIT": "1000/1s",
            "CYBERDESK_GATEWAY_ADDR": f"127.0.0.1:{free_port()}",
            "CYBERDESK_GATEWAY_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            **gateway_env,
        }
        gateway = Gateway(tmp, env, env["CYBERDESK_GATEWAY_ADDR"], env["CYBERDESK_GATEWAY_HTTP_ADDR"])
        gateway.start()
        cleanup.callback(gateway.stop)
        yield Stack(redis, svc, gateway)
