"""Start the servers a benchmark talks to: a real guest agent, and the FastAPI execD baseline."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
INSTANCE_ID = "i-bench"


@dataclass
class Agent:
    """A running guest agent: where it listens and how to authenticate."""

    target: str
    metadata: tuple[tuple[str, str], ...]
    instance_id: str
    pid: int
    workdir: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def agent(extra_env: dict[str, str] | None = None) -> Iterator[Agent]:
    """`python -m guest_agent` on a unix socket in a temporary directory, bound to INSTANCE_ID."""
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="cyberdesk-bench-") as tmp:
        target = f"unix://{tmp}/agent.sock"
        # A fresh home, as in an instance: the host user's shell profile (pyenv, conda...) would
        # otherwise dominate every `bash -lc` the agent runs.
        home = Path(tmp) / "home"
        home.mkdir()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "CYBERDESK_AGENT_LISTEN": target,
            "CYBERDESK_AGENT_TOKEN": token,
            "CYBERDESK_AGENT_INSTANCE_ID": INSTANCE_ID,
            "CYBERDESK_LOG_LEVEL": "WARNING",
            "HOME": str(home),
            **(extra_env or {}),
        }
        with open(Path(tmp) / "agent.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "guest_agent"], cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 20
            with grpc.insecure_channel(target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    try:
                        health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                        break
                    except grpc.RpcError:
                        if proc.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(f"the agent did not start; see {tmp}/agent.log") from None
                        time.sleep(0.05)
            yield Agent(target, (("authorization", f"Bearer {token}"),), INSTANCE_ID, proc.pid, Path(tmp))
        finally:
            _stop(proc)


@contextmanager
def baseline_execd(root: Path | None = None) -> Iterator[str]:
    """The FastAPI execD baseline under uvicorn on 127.0.0.1; yields its base URL."""
    import httpx

    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="cyberdesk-baseline-") as tmp:
        files_root = root or Path(tmp)
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.baseline_execd", "--port", str(port), "--root", str(files_root)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the baseline execD did not start")
                time.sleep(0.05)
            yield url
        finally:
            _stop(proc)
