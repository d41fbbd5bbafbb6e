"""OpenPort with `desktop` set: real x11vnc on a real Xvfb, started on demand and again after it died."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest

from cyberdesk_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from tests.guest_agent.integration.conftest import RunningAgent, running_agent
from tests.guest_agent.integration.test_desktop import xvfb  # noqa: F401 - the module's Xvfb fixture

pytestmark = pytest.mark.desktop


def _requests(items: queue.Queue[agent_pb2.OpenPortRequest | None]) -> Iterator[agent_pb2.OpenPortRequest]:
    while (item := items.get()) is not None:
        yield item


@pytest.fixture(scope="module")
def vnc_agent(xvfb: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:  # noqa: F811
    with running_agent(tmp_path_factory.mktemp("vnc-agent"), {"DISPLAY": xvfb}) as agent:
        yield agent


def _server_greeting(agent: RunningAgent) -> bytes:
    """Open the desktop tunnel and read the VNC server's ProtocolVersion (then close)."""
    stub = agent_pb2_grpc.PortServiceStub(agent.channel)
    items: queue.Queue[agent_pb2.OpenPortRequest | None] = queue.Queue()
    items.put(agent_pb2.OpenPortRequest(instance_id=agent.instance_id, desktop=True))
    call = stub.OpenPort(_requests(items), metadata=agent.metadata, timeout=30)
    try:
        replies = iter(call)
        assert next(replies).connected
        got = bytearray()
        while len(got) < 12:
            got += next(replies).data
        return bytes(got[:12])
    finally:
        items.put(None)
        call.cancel()


def _x11vnc_pids(agent: RunningAgent) -> set[int]:
    """The agent's x11vnc children."""
    out = subprocess.run(["pgrep", "-P", str(agent.service.proc.pid), "-x", "x11vnc"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def test_the_vnc_server_starts_on_demand_and_again_after_it_died(vnc_agent: RunningAgent) -> None:
    assert _x11vnc_pids(vnc_agent) == set()  # on demand: nothing before the first viewer
    assert _server_greeting(vnc_agent) == b"RFB 003.008\n"
    started = _x11vnc_pids(vnc_agent)
    assert len(started) == 1, f"one x11vnc for the agent, got {started}"
    # A second viewer shares the same server.
    assert _server_greeting(vnc_agent) == b"RFB 003.008\n"
    assert _x11vnc_pids(vnc_agent) == started
    # Killed (a tenant can kill it: same uid): the next viewer gets a new one.
    (pid,) = started
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid in _x11vnc_pids(vnc_agent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _server_greeting(vnc_agent) == b"RFB 003.008\n"
    again = _x11vnc_pids(vnc_agent)
    assert len(again) == 1 and again != started


def test_without_a_display_the_desktop_tunnel_is_failed_precondition(bound_agent: RunningAgent) -> None:
    stub = agent_pb2_grpc.PortServiceStub(bound_agent.channel)
    request = agent_pb2.OpenPortRequest(instance_id=bound_agent.instance_id, desktop=True)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.OpenPort(iter([request]), metadata=bound_agent.metadata, timeout=20))
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "no desktop" in (err.value.details() or "")
