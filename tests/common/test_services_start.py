"""Every service starts as `python -m <package>`, answers health and reflection, and stops cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.procs import free_port, service
from tests.support.reflection import list_services

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
TOKEN = "t" * 32

SERVICES = [
    ("instance_svc", "INSTANCE_ADDR"),
    ("gateway_svc", "GATEWAY_ADDR"),
    ("billing_svc", "BILLING_ADDR"),
]


@pytest.mark.parametrize(("module", "addr_var"), SERVICES)
def test_service_starts_answers_and_stops(module: str, addr_var: str, tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    env = {
        f"CYBERDESK_{addr_var}": target,
        "CYBERDESK_STATE_DIR": str(tmp_path / "state"),
        # The gateway's REST face would otherwise take the default port 8080.
        "CYBERDESK_GATEWAY_HTTP_ADDR": f"127.0.0.1:{free_port()}",
    }
    with service(module, target, env, tmp_path) as svc:
        names = list_services(target)
        assert {HEALTH, REFLECTION} <= names
        assert svc.terminate() == 0
    lines = [json.loads(line) for line in svc.log().splitlines() if line.startswith("{")]
    assert [line["msg"] for line in lines if line["msg"] in ("serving", "stopping", "stopped")] == [
        "serving",
        "stopping",
        "stopped",
    ]


def test_agent_starts_on_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    target = f"unix://{sock}"
    env = {"CYBERDESK_AGENT_LISTEN": target, "CYBERDESK_AGENT_TOKEN": TOKEN}
    with service("guest_agent", target, env, tmp_path) as svc:
        names = list_services(target)
        assert {HEALTH, REFLECTION, "cyberdesk.agent.v1.AgentService"} <= names
        assert svc.terminate() == 0
    assert TOKEN not in svc.log()


def test_agent_refuses_a_short_token(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support.procs import ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "guest_agent"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "CYBERDESK_AGENT_TOKEN": "short", "HOME": str(tmp_path)},
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert b"at least 16 characters" in proc.stderr


def test_agent_refuses_clear_text_tcp(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support.procs import ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "guest_agent"],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "CYBERDESK_AGENT_TOKEN": TOKEN,
            "CYBERDESK_AGENT_LISTEN": "127.0.0.1:0",
            "HOME": str(tmp_path),
        },
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert b"TLS" in proc.stderr
