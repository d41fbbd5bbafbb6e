"""The local runtime with real bubblewrap sandboxes and the real guest agent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from cyberdesk_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from instance_svc.runtime.base import AgentEndpoint, RuntimeError_, SandboxSpec
from instance_svc.runtime.local import LocalOptions, LocalRuntime
from tests.instance_svc.integration.runtime.conftest import Sandboxes


async def _agent_info(endpoint: AgentEndpoint, token: str | None = None) -> agent_pb2.GetAgentInfoResponse:
    async with grpc.aio.insecure_channel(endpoint.target) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        metadata = [("authorization", f"Bearer {endpoint.token if token is None else token}")]
        return await stub.GetAgentInfo(agent_pb2.GetAgentInfoRequest(), metadata=metadata, timeout=10)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_create_answers_with_token_and_delete_removes_everything(sandboxes: Sandboxes) -> None:
    info = sandboxes.run(sandboxes.runtime.create(SandboxSpec(sandbox_id="sb-a", instance_id="inst-a")))
    assert info.running and not info.paused
    reply = sandboxes.run(_agent_info(info.endpoint))
    assert reply.instance_id == "inst-a"
    assert reply.pid == 1  # the agent is the sandbox's first process
    with pytest.raises(grpc.aio.AioRpcError) as err:
        sandboxes.run(_agent_info(info.endpoint, token="not-the-token-at-all"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The token is in a 0600 file outside the sandbox, never in the agent's environment.
    state_file = sandboxes.base / "sb-a" / "state.json"
    assert state_file.stat().st_mode & 0o777 == 0o600
    pids = sandboxes.runtime.pids("sb-a")
    assert pids
    environ = Path(f"/proc/{sandboxes.runtime.init_pid('sb-a')}/environ").read_bytes()
    assert info.endpoint.token.encode() not in environ
    cgroups = json.loads(state_file.read_text())["cgroups"]

    sandboxes.run(sandboxes.runtime.delete("sb-a"))
    assert not (sandboxes.base / "sb-a").exists()
    assert not any(_alive(pid) for pid in pids)
    assert not any(Path(path).exists() for path in cgroups.values())
    sandboxes.run(sandboxes.runtime.delete("sb-a"))  # idempotent
    assert sandboxes.run(sandboxes.runtime.list()) == []


def test_sandbox_sees_only_itself(sandboxes: Sandboxes, tmp_path: Path) -> None:
    host_tmp_marker = Path("/tmp") / f"cyberdesk-marker-{os.getpid()}"
    host_tmp_marker.write_text("host")
    state_marker = sandboxes.base.parent / "cyberdesk.db"
    try:
        sandboxes.base.mkdir(parents=True, exist_ok=True)
        state_marker.write_text("database")
        sandboxes.run(sandboxes.runtime.create(SandboxSpec(sandbox_id="sb-one", instance_id="inst-one")))
        sandboxes.run(sandboxes.runtime.create(SandboxSpec(sandbox_id="sb-two")))
        (sandboxes.base / "sb-two" / "layer" / "home" / "user" / "secret").write_text("two")
        script = (
            "hostname; echo ---; ls /proc | grep -E '^[0-9]+$' | wc -l; echo ---; "
            "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; echo ---; ls -A /home /root /tmp; echo ---; "
            f"for p in /work /var/lib /sys {host_tmp_marker} {state_marker} {sandboxes.base} "
            f"/tmp/{host_tmp_marker.name} /home/user/secret {Path.home()}/.bashrc; do "
            "test -e $p && echo VISIBLE $p; done; echo end"
        )
        done = sandboxes.sh("sb-one", script)
        assert done.returncode == 0, done.stderr
        host, procs, nets, listing, visible = done.stdout.split("---\n")
        assert host.strip() == "inst-one"
        # The agent, the shells of this script and `ls`: no host process.
        assert int(procs) < 10
        assert nets.split() == ["lo"]
        assert "VISIBLE" not in visible and visible.strip() == "end"
        assert host_tmp_marker.name not in listing
        assert set(listing.split()) <= {"/home:", "user", "/root:", ".pyenv", "/tmp:"}

        # Only its own agent's socket: no other sandbox's is reachable (and its own delegated cgroups).
        assert sandboxes.sh("sb-one", "ls -A /run /run/cyberdesk").stdout.split() == [
            "/run:",
            "cgroup",
            "cyberdesk",
            "/run/cyberdesk:",
            "agent.sock",
        ]
    finally:
        host_tmp_marker.unlink()


def test_internet_gets_its_own_network_namespace(sandboxes: Sandboxes) -> None:
    # Never the host's namespace: loopback and slirp4netns's tap0 (what it may reach:
    # tests/instance_svc/integration/test_egress.py).
    sandboxes.run(sandboxes.runtime.create(SandboxSpec(sandbox_id="sb-net", internet=True)))
    done = sandboxes.sh("sb-net", "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; cat /etc/resolv.conf")
    assert done.stdout.split() == ["lo", "tap0", "nameserver", "10.0.2.3"]


def test_limits_are_reported_and_memory_is_enforced(sandboxes: Sandboxes) -> None:
    info = sandboxes.run(sandboxes.runtime.create(SandboxSpec(sandbox_id="sb-mem", memory_mib=64, vcpus=1)))
    limits = {limit.name: limit for limit in info.limits}
    assert limits["memory_bytes"].value == 64 * 1024 * 1024
    assert limits["vcpus"].value == 1
    assert set(limits) == {"memory_bytes", "vcpus", "pids", "disk_bytes"}
    assert (limits["disk_bytes"].value, limits["disk_bytes"].mechanism) == (2048 << 20, "filesystem")
    if limits["memory_bytes"].mechanism != "cgroup":
        pytest.skip(f"this host gives no memory cgroup (mechanism {limits['memory_bytes'].mechanism})")
    python = LocalOptions().python
    small = sandboxes.sh("sb-mem", f"{python} -c 'b = bytearray(8 << 20); print(len(b))'")
    assert small.stdout.strip() == str(8 << 20), small.stderr
    # Entered directly, not through the agent, so it lacks the oom_score_adj the agent gives its
    # commands (500): raised here as the agent would, or the OOM killer may pick the agent instead.
    big = sandboxes.sh(
        "sb-mem", f"echo 500 > /proc/self/oom_score_adj; exec {python} -c 'b = bytearray(256 << 20); print(len(b))'"
    )
    assert big.returncode != 0 and not big.stdout.strip()
    # The agent survived: the OOM killer took the process that went past the limit.
    assert sandboxes.run(sandboxes.runtime.list())[0].running


def test_pause_stops_processes_and_resume_continues(sandboxes: Sandboxes) -> None:
    sandboxes.run(sandboxes.runtime.create(SandboxSpec(sandbox_id="sb-p")))
    counter = sandboxes.base / "sb-p" / "layer" / "tmp" / "counter"
    sandboxes.spawn(
        "sb-p",
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/counter; sleep 0.01; done",
    )

    def wait_for_change(previous: str) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            value = counter.read_text() if counter.exists() else ""
            if value and value != previous:
                return value
            time.sleep(0.02)
        raise AssertionError(f"the counter did not move from {previous!r}")

    wait_for_change("")
    sandboxes.run(sandboxes.runtime.pause("sb-p"))
    assert sandboxes.run(sandboxes.runtime.list())[0].paused
    frozen_at = counter.read_text()
    time.sleep(0.5)
    assert counter.read_text() == frozen_at
    sandboxes.run(sandboxes.runtime.resume("sb-p"))
    assert not sandboxes.run(sandboxes.runtime.list())[0].paused
    wait_for_change(frozen_at)


def test_snapshot_round_trip(sandboxes: Sandboxes, tmp_path: Path) -> None:
    sandboxes.run(sandboxes.runtime.create(SandboxSpec(sandbox_id="sb-src")))
    wrote = sandboxes.sh(
        "sb-src", "mkdir -p /home/user/work && echo kept > /home/user/work/note && echo etc > /etc/mine"
    )
    assert wrote.returncode == 0, wrote.stderr
    result = sandboxes.run(sandboxes.runtime.snapshot("sb-src", tmp_path / "snaps" / "s1.tar.zst"))
    assert result.size_bytes == result.path.stat().st_size > 0
    assert not result.includes_memory
    assert not sandboxes.run(sandboxes.runtime.list())[0].paused  # resumed after the archive

    info = sandboxes.run(sandboxes.runtime.create(SandboxSpec(sandbox_id="sb-dst", restore_from=result.path)))
    assert sandboxes.run(_agent_info(info.endpoint)).pid == 1
    read = sandboxes.sh("sb-dst", "cat /home/user/work/note /etc/mine; hostname")
    assert read.stdout.split() == ["kept", "etc", "sb-dst"]


def test_a_new_runtime_re_adopts_running_sandboxes(sandboxes: Sandboxes) -> None:
    first = sandboxes.run(sandboxes.runtime.create(SandboxSpec(sandbox_id="sb-r", instance_id="inst-r")))
    sandboxes.run(sandboxes.runtime.close())

    restarted = LocalRuntime(sandboxes.base)
    (found,) = sandboxes.run(restarted.list())
    assert found.sandbox_id == "sb-r" and found.running
    assert found.endpoint == first.endpoint
    assert sandboxes.run(_agent_info(found.endpoint)).instance_id == "inst-r"

    # A sandbox that died while nobody watched is listed as not running.
    os.kill(restarted.init_pid("sb-r"), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while sandboxes.run(restarted.list())[0].running and time.monotonic() < deadline:
        sandboxes.runtime.pids("sb-r")  # reaps the exited bubblewrap, our child
        time.sleep(0.05)
    assert not sandboxes.run(restarted.list())[0].running
    sandboxes.run(restarted.delete("sb-r"))
    assert not (sandboxes.base / "sb-r").exists()


def test_desktop_sandbox_runs_xvfb(sandboxes: Sandboxes) -> None:
    info = sandboxes.run(sandboxes.runtime.create(SandboxSpec(sandbox_id="sb-x", desktop=(640, 480))))
    reply = sandboxes.run(_agent_info(info.endpoint))
    assert reply.desktop_available and reply.display == ":99"
    done = sandboxes.sh("sb-x", "DISPLAY=:99 xdpyinfo | grep dimensions")
    assert "640x480" in done.stdout, done.stderr


def test_bad_requests_fail_with_a_message(sandboxes: Sandboxes, tmp_path: Path) -> None:
    runtime = sandboxes.runtime
    with pytest.raises(RuntimeError_, match="not valid"):
        sandboxes.run(runtime.create(SandboxSpec(sandbox_id="../escape")))
    with pytest.raises(RuntimeError_, match="does not exist"):
        sandboxes.run(runtime.create(SandboxSpec(sandbox_id="sb-b", restore_from=tmp_path / "nope.tar.zst")))
    with pytest.raises(RuntimeError_, match="invalid name"):
        sandboxes.run(runtime.create(SandboxSpec(sandbox_id="sb-b", env={"A=B": "x"})))
    with pytest.raises(RuntimeError_, match="does not exist"):
        sandboxes.run(runtime.pause("sb-missing"))
    not_archive = tmp_path / "junk.tar.zst"
    not_archive.write_bytes(b"junk")
    with pytest.raises(RuntimeError_, match="not a snapshot archive"):
        sandboxes.run(runtime.create(SandboxSpec(sandbox_id="sb-b", restore_from=not_archive)))
    assert not (sandboxes.base / "sb-b").exists()

    sandboxes.run(runtime.create(SandboxSpec(sandbox_id="sb-b")))
    with pytest.raises(RuntimeError_, match="already exists"):
        sandboxes.run(runtime.create(SandboxSpec(sandbox_id="sb-b")))
    assert sandboxes.run(runtime.list())[0].running  # the failed duplicate did not harm the first


def test_an_agent_that_cannot_start_fails_create_with_its_log(tmp_path: Path) -> None:
    base = tmp_path / "instances"
    runtime = LocalRuntime(base, LocalOptions(python=Path("/usr/bin/false"), ready_timeout=10))
    # Which of the two is seen depends on how soon the sandbox is gone: before its start time is
    # read ("exited at once") or while the agent is awaited ("exited with").
    with pytest.raises(RuntimeError_, match=r"exited with|exited at once"):
        asyncio.run(runtime.create(SandboxSpec(sandbox_id="sb-f")))
    assert not (base / "sb-f").exists()


def test_boots_beyond_parallel_boots_wait_their_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted between the sandbox's spawn and its agent answering: the span the bound is for.
    from instance_svc.runtime.local import spawn

    booting: list[int] = [0]
    most: list[int] = [0]
    real_spawn, real_wait = spawn.spawn_sandbox, spawn.wait_until_healthy

    def counting_spawn(*args: Any, **kwargs: Any) -> Any:
        booting[0] += 1
        most[0] = max(most[0], booting[0])
        return real_spawn(*args, **kwargs)

    async def counting_wait(*args: Any, **kwargs: Any) -> None:
        try:
            await real_wait(*args, **kwargs)
        finally:
            booting[0] -= 1

    monkeypatch.setattr(spawn, "spawn_sandbox", counting_spawn)
    monkeypatch.setattr(spawn, "wait_until_healthy", counting_wait)
    runtime = LocalRuntime(tmp_path / "instances", LocalOptions(parallel_boots=2))

    async def create_three() -> list[bool]:
        try:
            made = await asyncio.gather(*(runtime.create(SandboxSpec(sandbox_id=f"sb-q{n}")) for n in range(3)))
            return [info.running for info in made]
        finally:
            for n in range(3):
                await runtime.delete(f"sb-q{n}")

    assert asyncio.run(create_three()) == [True, True, True]
    assert most[0] == 2  # two at once, never the third


def test_a_path_too_long_for_the_agents_socket_is_refused_before_anything_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # connect() refuses a unix socket path over 107 bytes; grpc would only show an agent that never answers.
    LocalRuntime(tmp_path / ("d" * (120 - len(str(tmp_path)))))
    assert "too long a path for the agents' unix sockets" in caplog.text  # the operator is told at the start
    base = tmp_path / "i"
    runtime = LocalRuntime(base)
    long_id = "sb-" + "x" * (107 - len(str(base)) - len("//sock/agent.sock") - 2)
    with pytest.raises(RuntimeError_, match="too long for this host's state directory") as refused:
        asyncio.run(runtime.create(SandboxSpec(sandbox_id=long_id)))
    assert str(base) not in str(refused.value)  # no host path in what a tenant may see
    assert not (base / long_id).exists()
