"""A sandbox whose agent (or bubblewrap) is killed: its instance ends FAILED saying so, at once, and frees its slot.

instance_svc watches each sandbox's agent and bubblewrap through pidfds (no sweep), for sandboxes
it started and for those it re-adopted after a restart alike. The FAILED event is read from the
Redis stream the publisher writes (what billing and WatchInstances read), within a generous bound.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis

from cyberdesk_common.lifecycle_events import STREAM
from cyberdesk_proto.v1 import instance_pb2
from tests.instance_svc.conftest import Svc, meta, running
from tests.support import leftovers

_EVENT_WAIT_S = 15.0


def _create(svc: Svc) -> instance_pb2.Instance:
    inst = svc.instances.CreateInstance(
        instance_pb2.CreateInstanceRequest(disk_mib=256), metadata=meta(), timeout=120
    ).instance
    assert inst.state == instance_pb2.INSTANCE_STATE_RUNNING, inst
    return inst


def _pids(svc: Svc, instance_id: str) -> tuple[int, int]:
    """(the agent's host pid, the outer bubblewrap's pid), from the sandbox's state file."""
    state = json.loads((svc.state / "instances" / ("sb-" + instance_id[2:]) / "state.json").read_text())
    return int(state["init_pid"]), int(state["pid"])


def _stream_end(client: redis.Redis) -> str:
    last = client.xrevrange(STREAM, count=1)
    return str(last[0][0]) if last else "0-0"


def _failed_event(client: redis.Redis, instance_id: str, since: str) -> dict[str, str]:
    """The FAILED event of `instance_id` published after stream id `since`."""
    deadline = time.monotonic() + _EVENT_WAIT_S
    while time.monotonic() < deadline:
        for _stream, entries in client.xread({STREAM: since}, block=1000) or []:
            for entry_id, fields in entries:
                since = entry_id
                if fields["instance_id"] == instance_id and fields["new_state"] == "FAILED":
                    return dict(fields)
    pytest.fail(f"no FAILED event of {instance_id} within {_EVENT_WAIT_S:g} s")


def _kill_and_check(svc: Svc, client: redis.Redis, inst: instance_pb2.Instance, which: str, reason: str) -> None:
    agent, bwrap = _pids(svc, inst.instance_id)
    since = _stream_end(client)
    os.kill(agent if which == "agent" else bwrap, signal.SIGKILL)
    event = _failed_event(client, inst.instance_id, since)
    assert event["state_message"] == reason
    got = svc.instances.GetInstance(
        instance_pb2.GetInstanceRequest(instance_id=inst.instance_id), metadata=meta()
    ).instance
    assert got.state == instance_pb2.INSTANCE_STATE_FAILED and got.state_message == reason
    assert got.HasField("end_time")
    # Torn down with it: nothing of the sandbox is left on the host (the event follows the teardown).
    assert not leftovers.not_owned(svc.state / "instances", set())


def test_a_killed_agent_fails_its_instance_frees_its_slot_also_after_a_restart(tmp_path: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with running(tmp_path, redis_url, quota_instances="1") as svc:
        first = _create(svc)
        _kill_and_check(svc, client, first, "agent", "the guest agent exited (killed by SIGKILL)")

        # The slot is free again: a create at the limit of 1 succeeds.
        second = _create(svc)
        # A re-adopted sandbox is watched too (its bubblewrap is no child of the new instance_svc).
        svc.kill9()
        svc.start()
        _kill_and_check(svc, client, second, "agent", "the guest agent exited (killed by SIGKILL)")

        # The outer bubblewrap alone killed: the sandbox cannot be managed any more, so it ends too.
        third = _create(svc)
        _kill_and_check(svc, client, third, "bwrap", "the sandbox's bubblewrap process exited (killed by SIGKILL)")
        _create(svc)
    client.close()
