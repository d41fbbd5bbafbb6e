"""Where a sandbox is spawned: the token pipe, the agent's environment, the process, the wait for health.

The order matters for cleanup: `spawn_sandbox` returns the process before anything can fail on
its account, so the caller records it (and its pid in the state file) first, and a failed start
still finds something to kill. Readiness is two steps: bubblewrap's --info-fd JSON says the
sandbox's PID 1 exists, then the agent's gRPC health service says it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instance_svc.runtime.base import RuntimeError_, SandboxSpec
from instance_svc.runtime.local import bwrap, procscan, seccomp

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sandbox_env(spec: SandboxSpec, token_fd: int, mark: str = "") -> dict[str, str]:
    """The environment of the sandbox's PID 1: the spec's env, then what the agent needs (which wins).

    `mark` (procscan.MARK_ENV) is how the start-up sweep finds the launcher and bubblewrap of a
    sandbox whose pid no state file recorded yet.
    """
    env = {
        "PATH": _PATH,
        "HOME": "/home/user",
        "USER": "user",
        "LANG": "C.UTF-8",
        **spec.env,
        "PYTHONPATH": f"{bwrap.AGENT_DIR}/agent:{bwrap.AGENT_DIR}/site-packages",
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "CYBERDESK_AGENT_LISTEN": f"unix://{bwrap.SOCK_DIR}/agent.sock",
        "CYBERDESK_AGENT_TOKEN_FILE": f"/proc/self/fd/{token_fd}",
        "CYBERDESK_AGENT_INSTANCE_ID": spec.instance_id,
        # For messages: a full disk is the instance's own (RESOURCE_EXHAUSTED "disk (N MiB) is full").
        "CYBERDESK_AGENT_DISK_MIB": str(spec.disk_mib),
    }
    if mark:
        env[procscan.MARK_ENV] = mark
    if spec.desktop is not None:
        env["DISPLAY"] = ":99"
    return env


def spawn_sandbox(
    directory: Path, spec: SandboxSpec, launch: bwrap.Launch, token: str, mark: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the sandbox's launcher; returns the process and the read end of the --info-fd pipe (yours to close).

    Popen forks and execs at once (no waiting), so this is called on the event loop.
    """
    token_r, token_w = os.pipe()
    info_r, info_w = os.pipe()
    seccomp_fd = seccomp.filter_fd(launch.nested_userns)
    env = sandbox_env(spec, token_r, mark)
    if launch.cgroup_binds:
        # The agent's own per-command cgroups (guest_agent/process_cgroups.py) live under this dir.
        env["CYBERDESK_AGENT_CGROUP_DIR"] = bwrap.CGROUP_DIR
    try:
        # The agent opens /proc/self/fd/N, which checks the pipe's owner: give it to the sandbox uid.
        os.fchown(token_r, launch.uid, launch.gid)
        os.write(token_w, token.encode())
        os.close(token_w)
        token_w = -1
        with open(directory / "agent.log", "ab") as log:
            proc = subprocess.Popen(
                bwrap.argv(dataclasses.replace(launch, info_fd=info_w, seccomp_fd=seccomp_fd)),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # The --block-fd read end (INTERNET sandboxes) is the caller's, closed by the caller.
                pass_fds=(token_r, info_w, seccomp_fd, *([launch.block_fd] if launch.block_fd >= 0 else [])),
                start_new_session=True,  # not in our process group: a ^C or kill of us spares it
                cwd="/",
            )
    except BaseException:
        os.close(info_r)
        raise
    finally:
        for fd in (token_r, info_w, token_w, seccomp_fd):
            if fd >= 0:
                os.close(fd)
    return proc, info_r


def read_init_pid(directory: Path, sandbox_id: str, fd: int, proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The sandbox's PID 1 as the host sees it, from bubblewrap's --info-fd JSON (blocking: run it in a thread)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            chunk = os.read(fd, 4096)
            buf += chunk
            with contextlib.suppress(ValueError):
                parsed: dict[str, Any] = json.loads(buf)
                return int(parsed["child-pid"])
            if not chunk:
                break
        elif proc.poll() is not None:
            break
    raise RuntimeError_(f"bubblewrap did not start sandbox {sandbox_id}: {log_tail(directory)}")


async def wait_until_healthy(
    directory: Path, sandbox_id: str, proc: subprocess.Popen[bytes], ready_timeout: float
) -> None:
    """Return once the agent's health service answers SERVING; RuntimeError_ with its log otherwise."""
    sock = directory / "sock" / "agent.sock"
    deadline = time.monotonic() + ready_timeout
    while not sock.exists():
        if proc.poll() is not None:
            raise RuntimeError_(
                f"the agent of sandbox {sandbox_id} exited with {proc.returncode}: {log_tail(directory)}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError_(
                f"the agent of sandbox {sandbox_id} did not listen within {ready_timeout:.0f} s: {log_tail(directory)}"
            )
        await asyncio.sleep(0.003)
    async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError_(f"the agent of sandbox {sandbox_id} did not become healthy: {log_tail(directory)}")
            await asyncio.sleep(0.005)


def log_tail(directory: Path, limit: int = 1500) -> str:
    """The end of the sandbox's agent.log, for error messages."""
    try:
        text = (directory / "agent.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-limit:].strip() or "(empty log)"
