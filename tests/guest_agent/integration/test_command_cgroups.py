"""Per-command cgroups of a bare agent (guest_agent/process_cgroups.py), without a sandbox.

The tests run as root, so a hierarchy made by the test under /sys/fs/cgroup stands in for the one
a runtime delegates (the sandbox case, with the real delegation to an unprivileged uid, is
tests/instance_svc/integration/test_confinement.py). Without one the agent falls back to killing
process groups and a timeout's error says so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cyberdesk_proto.v1 import process_pb2, process_pb2_grpc
from tests.guest_agent.integration.conftest import INSTANCE_ID, RunningAgent, running_agent

_CONTROLLERS = ("pids", "freezer", "memory")


def _pids_with(marker: str) -> list[int]:
    """Live (not zombie) processes of this machine whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(entry.name))
    return found


def _wait_gone(marker: str, seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _pids_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _run(agent: RunningAgent, command: str, timeout: float | None = None) -> process_pb2.RunProcessResponse:
    request = process_pb2.RunProcessRequest(instance_id=INSTANCE_ID, command=command)
    if timeout is not None:
        request.timeout.FromNanoseconds(int(timeout * 1e9))
    stub = process_pb2_grpc.ProcessServiceStub(agent.channel)
    reply: process_pb2.RunProcessResponse = stub.RunProcess(request, metadata=agent.metadata, timeout=60)
    return reply


@pytest.fixture
def hierarchy(tmp_path: Path) -> Iterator[Path]:
    """A dir of links to fresh cgroups, one per controller, as CYBERDESK_AGENT_CGROUP_DIR names them."""
    if os.geteuid() != 0 or not Path("/sys/fs/cgroup/pids/cgroup.procs").exists():
        pytest.skip("needs root and cgroup v1 (pids, freezer, memory)")
    links = tmp_path / "cgroup"
    links.mkdir()
    made = []
    for ctrl in _CONTROLLERS:
        path = Path(f"/sys/fs/cgroup/{ctrl}/cyberdesk-test-{os.getpid()}-{tmp_path.name}")
        path.mkdir()
        made.append(path)
        (links / ctrl).symlink_to(path)
    (made[2] / "memory.limit_in_bytes").write_text(str(256 << 20))
    yield links
    for path in made:  # deepest first: the agent's and the commands' cgroups, then the top
        for sub in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            path.rmdir()


def test_a_timeout_kills_what_left_the_process_group(tmp_path: Path, hierarchy: Path) -> None:
    with running_agent(tmp_path, {"DISPLAY": "", "CYBERDESK_AGENT_CGROUP_DIR": str(hierarchy)}) as agent:
        reply = _run(agent, "setsid sleep 3171 & (nohup sleep 3172 >/dev/null 2>&1 &); sleep 60", timeout=1)
        assert reply.exited.timed_out
        assert reply.exited.error == "timed out after 1 s; it and every process it started were killed"
        assert _wait_gone("sleep 3171") == [] and _wait_gone("sleep 3172") == []
        # The agent lives in its own child cgroup, each command in a cgroup of its own.
        assert (hierarchy / "pids" / "agent").is_dir()
        assert str(agent.service.proc.pid) in (hierarchy / "pids" / "agent" / "cgroup.procs").read_text().split()
        own = _run(agent, "cat /proc/self/cgroup")
        assert any(":pids:/" in line and "/cmd-" in line for line in own.stdout.decode().splitlines())


def test_out_of_memory_is_said_with_the_limit(tmp_path: Path, hierarchy: Path) -> None:
    with running_agent(tmp_path, {"DISPLAY": "", "CYBERDESK_AGENT_CGROUP_DIR": str(hierarchy)}) as agent:
        reply = _run(agent, "python3 -c 'a = []\nwhile True: a.append(bytearray(16 << 20))'")
        assert reply.exited.out_of_memory
        assert "out of memory" in reply.exited.error and "memory limit of 256 MiB" in reply.exited.error
        assert _run(agent, "echo alive").stdout == b"alive\n"  # the OOM killer spared the agent


def test_without_a_hierarchy_the_timeout_says_only_the_process_group_was_killed(tmp_path: Path) -> None:
    with running_agent(tmp_path, {"DISPLAY": "", "CYBERDESK_AGENT_CGROUP_DIR": ""}) as agent:
        try:
            reply = _run(agent, "setsid sleep 3173 & sleep 60", timeout=1)
            assert reply.exited.timed_out
            assert "its process group was killed (no per-command cgroup here" in reply.exited.error
            assert _pids_with("sleep 3173")  # the known limit of the fallback, said in the error
        finally:
            for pid in _pids_with("sleep 3173"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_a_killed_commands_late_sigkill_spares_the_next_commands_in_its_recycled_cgroup(
    tmp_path: Path, hierarchy: Path
) -> None:
    # A killed command's SIGKILL pass comes kill_grace_seconds after its SIGTERM. A command that
    # dies of the SIGTERM at once leaves an empty cgroup, recycled (50 ms after its exit) as the
    # spare of a later command; the late pass must not reach that one (it did: a background `cat`
    # started right after an interrupted exec was killed 2 s later, "process N has already exited").
    env = {"DISPLAY": "", "CYBERDESK_AGENT_CGROUP_DIR": str(hierarchy), "CYBERDESK_AGENT_KILL_GRACE_SECONDS": "1.5"}
    with running_agent(tmp_path, env) as agent:
        stub = process_pb2_grpc.ProcessServiceStub(agent.channel)
        reply = _run(agent, "exec sleep 3173", timeout=0.2)  # SIGTERM ends it at once
        assert reply.exited.timed_out
        time.sleep(0.3)  # its empty cgroup is recycled meanwhile
        pids = []
        for n in range(3):  # the first takes the spare made before; a later one the recycled cgroup
            start = process_pb2.StartProcessRequest(
                instance_id=INSTANCE_ID, command=f"exec sleep 317{4 + n}", background=True
            )
            started = next(iter(stub.StartProcess(start, metadata=agent.metadata, timeout=10)))
            pids.append(started.event.started.pid)
        time.sleep(2.0)  # past the killed command's grace period
        alive = [n for n in range(3) if _pids_with(f"sleep 317{4 + n}")]
        assert alive == [0, 1, 2], "a later command was killed by the earlier one's SIGKILL pass"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
