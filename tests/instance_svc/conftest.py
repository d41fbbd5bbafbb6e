"""A real instance_svc process (local runtime, real Redis) and a gRPC client for it.

Used by integration/test_service.py and by the gateway's REST end-to-end tests
(tests/gateway_svc/rest/conftest.py imports `running` and `TOKEN` from here), which is why it sits
above unit/ and integration/. The unit tests use none of it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from cyberdesk_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from cyberdesk_proto.internal.v1 import routing_pb2, routing_pb2_grpc
from cyberdesk_proto.v1 import instance_pb2_grpc, process_pb2, process_pb2_grpc
from cyberdesk_stack.processes import spawn, stop
from tests.support.procs import ROOT, free_port, wait_healthy

TOKEN = "internal-" + "k" * 40


@dataclass
class Svc:
    """One instance_svc process; `restart` keeps its state directory."""

    state: Path
    logdir: Path
    env: dict[str, str]
    target: str = ""
    proc: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None
    logs: list[Path] = field(default_factory=list)

    def start(self) -> None:
        log = self.logdir / f"instance_svc.{len(self.logs)}.log"
        self.logs.append(log)
        self.proc = spawn([sys.executable, "-m", "instance_svc"], self.env, log)
        wait_healthy(self.target, timeout=30, proc=self.proc)
        self.channel = grpc.insecure_channel(self.target)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        if self.channel is not None:
            self.channel.close()

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None:
            stop(self.proc, timeout=20)

    @property
    def instances(self) -> instance_pb2_grpc.InstanceServiceStub:
        assert self.channel is not None
        return instance_pb2_grpc.InstanceServiceStub(self.channel)

    @property
    def routing(self) -> routing_pb2_grpc.RoutingServiceStub:
        assert self.channel is not None
        return routing_pb2_grpc.RoutingServiceStub(self.channel)

    def resolve(self, instance_id: str, tenant: str = "t1") -> routing_pb2.ResolveInstanceResponse:
        return self.routing.ResolveInstance(
            routing_pb2.ResolveInstanceRequest(tenant_id=tenant, instance_id=instance_id), metadata=meta(), timeout=10
        )

    def agent_info(self, instance_id: str) -> agent_pb2.GetAgentInfoResponse:
        resolved = self.resolve(instance_id)
        with grpc.insecure_channel(resolved.agent_target) as chan:
            return agent_pb2_grpc.AgentServiceStub(chan).GetAgentInfo(
                agent_pb2.GetAgentInfoRequest(),
                metadata=(("authorization", f"Bearer {resolved.agent_token}"),),
                timeout=10,
            )

    def exec(self, instance_id: str, command: str) -> tuple[int, bytes]:
        """Run `command` in the instance through its agent's ProcessService; (exit code, stdout)."""
        resolved = self.resolve(instance_id)
        out = b""
        code: int | None = None
        with grpc.insecure_channel(resolved.agent_target) as chan:
            stub = process_pb2_grpc.ProcessServiceStub(chan)
            # Read the stream to its end (the exit event is its last) rather than cancel it.
            for reply in stub.StartProcess(
                process_pb2.StartProcessRequest(instance_id=instance_id, command=command),
                metadata=(("authorization", f"Bearer {resolved.agent_token}"),),
                timeout=30,
            ):
                if reply.event.HasField("stdout"):
                    out += reply.event.stdout
                if reply.event.HasField("exited"):
                    code = reply.event.exited.exit_code
        assert code is not None, "the process stream ended without an exit event"
        return code, out


def meta(tenant: str = "t1") -> tuple[tuple[str, str], ...]:
    """Metadata the gateway sends."""
    return (("x-cyberdesk-internal-token", TOKEN), ("x-cyberdesk-tenant", tenant))


def _sandbox_ready() -> None:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is not installed; run `make setup`")


@contextmanager
def running(tmp: Path, redis_url: str, environ: dict[str, str] | None = None, **extra: str) -> Iterator[Svc]:
    """Start instance_svc with `extra` CYBERDESK_* settings (and `environ` as given); stop it (SIGTERM) at the end."""
    _sandbox_ready()
    # A short path: agent sockets live under it and a unix socket path holds at most 107 bytes.
    state = Path(tempfile.mkdtemp(prefix="cdi-", dir="/tmp"))
    port = free_port()
    env = {
        "CYBERDESK_STATE_DIR": str(state),
        "CYBERDESK_INSTANCE_ADDR": f"127.0.0.1:{port}",
        "CYBERDESK_INTERNAL_TOKEN": TOKEN,
        "CYBERDESK_WARM_POOL": "base=0",
        "REDIS_URL": redis_url,
        **{f"CYBERDESK_{k.upper()}": v for k, v in extra.items()},
        **(environ or {}),
    }
    svc = Svc(state, tmp, env, target=f"127.0.0.1:{port}")
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
        # Shown by pytest when the test failed: what each sandbox's agent said.
        for log in sorted(state.glob("instances/*/agent.log")):
            print(f"--- {log.parent.name}/agent.log\n{log.read_text(errors='replace')[-2000:]}")
        _remove_sandboxes(state)
        shutil.rmtree(state, ignore_errors=True)


def _remove_sandboxes(state: Path) -> None:
    """Delete what the test left behind (a test that fails half-way must not leak sandboxes)."""
    base = state / "instances"
    if not base.exists():
        return
    code = (
        "import asyncio,sys; from pathlib import Path; from instance_svc.runtime.local import LocalRuntime\n"
        "async def main():\n"
        "    rt = LocalRuntime(Path(sys.argv[1]))\n"
        "    for info in await rt.list():\n"
        "        await rt.delete(info.sandbox_id)\n"
        "    await rt.close()\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", code, str(base)], cwd=ROOT, timeout=60, check=False)
