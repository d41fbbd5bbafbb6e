"""What goes into a sandbox, decided without starting one: the agent's environment, the bound code,
the kind of a snapshot archive, and the /proc identity check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from instance_svc.runtime.base import RuntimeError_, SandboxSpec
from instance_svc.runtime.local import agent_code, procscan, snapshots, spawn


def test_the_agent_environment_wins_over_the_spec_and_carries_no_token() -> None:
    spec = SandboxSpec(sandbox_id="sb-a", instance_id="i-a", env={"GREETING": "hi", "PYTHONPATH": "/evil"})
    env = spawn.sandbox_env(spec, 5)
    assert env["GREETING"] == "hi"
    assert env["PYTHONPATH"] == "/opt/cyberdesk/agent:/opt/cyberdesk/site-packages"
    assert env["CYBERDESK_AGENT_TOKEN_FILE"] == "/proc/self/fd/5"
    assert env["CYBERDESK_AGENT_INSTANCE_ID"] == "i-a"
    assert env["CYBERDESK_AGENT_LISTEN"] == "unix:///run/cyberdesk/agent.sock"
    assert "DISPLAY" not in env
    assert spawn.sandbox_env(SandboxSpec(sandbox_id="sb-d", desktop=(800, 600)), 5)["DISPLAY"] == ":99"


def test_a_sandbox_binds_exactly_the_agent_packages() -> None:
    assert [p.name for p in agent_code.package_dirs()] == [
        "guest_agent",
        "cyberdesk_common",
        "cyberdesk_proto",
        "cyberdesk",
    ]
    assert (agent_code.site_packages() / "grpc").is_dir()


def test_archive_kind_reads_the_magic_bytes(tmp_path: Path) -> None:
    zstd, gz, junk = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    zstd.write_bytes(b"\x28\xb5\x2f\xfd rest")
    gz.write_bytes(b"\x1f\x8b rest")
    junk.write_bytes(b"junk")
    assert snapshots.archive_kind(zstd) == "--zstd"
    assert snapshots.archive_kind(gz) == "--gzip"
    with pytest.raises(RuntimeError_, match="not a snapshot archive"):
        snapshots.archive_kind(junk)


def test_start_time_names_a_live_process_and_descendants_finds_children() -> None:
    assert procscan.start_time(os.getpid()) is not None
    assert procscan.start_time(2**22 + 1) is None  # above pid_max: never a process
    parent = os.getppid()
    assert os.getpid() in procscan.descendants(parent)
