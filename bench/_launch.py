"""Start the servers a benchmark talks to: a real guest agent, instance_svc's setting, the FastAPI execD baseline.

Both through the one process launcher the stack and the tests use (`cyberdesk_stack.processes`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cyberdesk_stack.processes import AgentProcess, free_port, guest_agent, redis_server, spawn, stop

__all__ = [
    "INSTANCE_ID",
    "INTERNAL_TOKEN",
    "ROOT",
    "AgentProcess",
    "Caller",
    "agent",
    "baseline_execd",
    "free_port",
    "instance_svc_setting",
]

ROOT = Path(__file__).resolve().parents[1]
INSTANCE_ID = "i-bench"
INTERNAL_TOKEN = "bench-internal-" + "x" * 32  # what a bench presents to instance_svc as the gateway would


@contextmanager
def instance_svc_setting(**settings: str) -> Iterator[tuple[Path, dict[str, str], str]]:
    """A state directory, a Redis and instance_svc's environment (not started): (state, env, target).

    `settings` are extra CYBERDESK_* values by lower-case name (e.g. warm_pool="base=2"); the
    state directory and what is left in it are removed at the end.
    """
    # A short state path: agent sockets live under it (unix socket paths hold at most 107 bytes).
    state = Path(tempfile.mkdtemp(prefix="cdb-", dir="/tmp"))
    target = f"127.0.0.1:{free_port()}"
    try:
        with redis_server(state) as redis_url:
            env = {
                "CYBERDESK_STATE_DIR": str(state),
                "CYBERDESK_INSTANCE_ADDR": target,
                "CYBERDESK_INTERNAL_TOKEN": INTERNAL_TOKEN,
                "CYBERDESK_WARM_POOL": "base=0",
                "CYBERDESK_LOG_LEVEL": "WARNING",
                "REDIS_URL": redis_url,
                **{f"CYBERDESK_{name.upper()}": value for name, value in settings.items()},
            }
            yield state, env, target
    finally:
        shutil.rmtree(state, ignore_errors=True)


@dataclass(frozen=True)
class Caller:
    """Where a benchmark sends an instance's calls: the agent itself, or the gateway in front of it."""

    target: str
    metadata: tuple[tuple[str, str], ...]
    instance_id: str

    @classmethod
    def of(cls, running: AgentProcess) -> Caller:
        """Calls straight to a running agent."""
        return cls(running.target, running.metadata, running.instance_id)


@contextmanager
def agent(extra_env: dict[str, str] | None = None) -> Iterator[AgentProcess]:
    """`python -m guest_agent` on a unix socket in a temporary directory, bound to INSTANCE_ID."""
    with (
        tempfile.TemporaryDirectory(prefix="cyberdesk-bench-") as tmp,
        guest_agent(Path(tmp), INSTANCE_ID, env={"CYBERDESK_LOG_LEVEL": "WARNING", **(extra_env or {})}) as running,
    ):
        yield running


@contextmanager
def baseline_execd(root: Path | None = None) -> Iterator[str]:
    """The FastAPI execD baseline under uvicorn on 127.0.0.1; yields its base URL."""
    import httpx

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cyberdesk-baseline-") as tmp:
        files_root = root or Path(tmp)
        argv = [sys.executable, "-m", "bench.baseline_execd", "--port", str(port), "--root", str(files_root)]
        proc = spawn(argv, None, Path(tmp) / "baseline.log")
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
            stop(proc)
