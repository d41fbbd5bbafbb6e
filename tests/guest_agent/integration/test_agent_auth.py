"""The agent answers only callers holding its per-instance token, and binds to one instance only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cyberdesk_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from tests.support.procs import Service, service

TOKEN = "s3cr3t-" + "x" * 25


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Service]:
    target = f"unix://{tmp_path / 'agent.sock'}"
    env = {"CYBERDESK_AGENT_LISTEN": target, "CYBERDESK_AGENT_TOKEN": TOKEN}
    with service("guest_agent", target, env, tmp_path) as svc:
        yield svc


def _stub(target: str) -> tuple[grpc.Channel, agent_pb2_grpc.AgentServiceStub]:
    channel = grpc.insecure_channel(target)
    return channel, agent_pb2_grpc.AgentServiceStub(channel)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [((), "missing"), ((("authorization", "Bearer wrong"),), "not valid"), ((("authorization", TOKEN),), "not valid")],
)
def test_calls_without_the_token_are_unauthenticated(
    agent: Service, metadata: tuple[tuple[str, str], ...], message: str
) -> None:
    channel, stub = _stub(agent.target)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.GetAgentInfo(agent_pb2.GetAgentInfoRequest(), metadata=metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in (err.value.details() or "")


def test_configure_binds_once_and_logs_no_secret(agent: Service) -> None:
    auth = (("authorization", f"Bearer {TOKEN}"),)
    channel, stub = _stub(agent.target)
    with channel:
        info = stub.GetAgentInfo(agent_pb2.GetAgentInfoRequest(), metadata=auth, timeout=5)
        assert info.instance_id == ""
        stub.ConfigureAgent(
            agent_pb2.ConfigureAgentRequest(instance_id="i-1", env={"API_TOKEN": "hidden"}), metadata=auth, timeout=5
        )
        assert stub.GetAgentInfo(agent_pb2.GetAgentInfoRequest(), metadata=auth, timeout=5).instance_id == "i-1"
        with pytest.raises(grpc.RpcError) as err:
            stub.ConfigureAgent(agent_pb2.ConfigureAgentRequest(instance_id="i-2"), metadata=auth, timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "i-1" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            stub.ConfigureAgent(agent_pb2.ConfigureAgentRequest(), metadata=auth, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    agent.terminate()
    log = agent.log()
    assert TOKEN not in log and "hidden" not in log
    calls = [json.loads(line) for line in log.splitlines() if '"msg":"rpc"' in line]
    assert {c["method"] for c in calls} >= {"/cyberdesk.agent.v1.AgentService/ConfigureAgent"}
    assert {c["code"] for c in calls} >= {"OK", "FAILED_PRECONDITION", "INVALID_ARGUMENT"}
