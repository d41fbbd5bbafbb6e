"""instance_svc as a real process: real sandboxes, real Redis, a real gRPC client."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from cyberdesk.v1 import instance_pb2
from tests.instance_svc.conftest import TOKEN, meta, running

RUNNING = instance_pb2.INSTANCE_STATE_RUNNING
TERMINATED = instance_pb2.INSTANCE_STATE_TERMINATED


def _wait_state(svc: object, instance_id: str, state: int, bound: float = 60.0) -> instance_pb2.Instance:
    deadline = time.monotonic() + bound
    while True:
        got = svc.instances.GetInstance(  # type: ignore[attr-defined]
            instance_pb2.GetInstanceRequest(instance_id=instance_id), metadata=meta(), timeout=10
        ).instance
        if got.state == state or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_create_use_delete(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url) as svc:
        created = svc.instances.CreateInstance(
            instance_pb2.CreateInstanceRequest(labels={"team": "a"}, env={"GREETING": "hi"}),
            metadata=meta(),
            timeout=60,
        ).instance
        assert created.state == RUNNING, created.state_message
        assert created.runtime == "local" and created.vcpus == 1 and created.memory_mib == 512
        assert created.enforced_limits  # what the runtime really enforces, and how
        info = svc.agent_info(created.instance_id)
        assert info.instance_id == created.instance_id
        # Another tenant sees nothing, not even a hint.
        with pytest.raises(grpc.RpcError) as err:
            svc.instances.GetInstance(
                instance_pb2.GetInstanceRequest(instance_id=created.instance_id), metadata=meta("t2"), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        deleted = svc.instances.DeleteInstance(
            instance_pb2.DeleteInstanceRequest(instance_id=created.instance_id), metadata=meta(), timeout=60
        ).instance
        assert deleted.state == TERMINATED and deleted.HasField("end_time")
        again = svc.instances.DeleteInstance(
            instance_pb2.DeleteInstanceRequest(instance_id=created.instance_id), metadata=meta(), timeout=60
        ).instance
        assert again.state == TERMINATED
        assert svc.resolve(created.instance_id).state == TERMINATED
        assert svc.resolve(created.instance_id).agent_token == ""
    assert "GREETING" not in svc.log() and TOKEN not in svc.log()


def test_expiry_at_deadline_and_after_set_timeout(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url) as svc:
        short = svc.instances.CreateInstance(
            instance_pb2.CreateInstanceRequest(timeout=duration_pb2.Duration(seconds=2)), metadata=meta(), timeout=60
        ).instance
        moved = svc.instances.CreateInstance(
            instance_pb2.CreateInstanceRequest(timeout=duration_pb2.Duration(seconds=3600)), metadata=meta(), timeout=60
        ).instance
        assert short.state == RUNNING and moved.state == RUNNING
        reply = svc.instances.SetInstanceTimeout(
            instance_pb2.SetInstanceTimeoutRequest(
                instance_id=moved.instance_id, timeout=duration_pb2.Duration(seconds=2)
            ),
            metadata=meta(),
            timeout=10,
        ).instance
        assert reply.expire_time.ToSeconds() < moved.expire_time.ToSeconds()
        for instance_id in (short.instance_id, moved.instance_id):
            got = _wait_state(svc, instance_id, TERMINATED)
            assert got.state == TERMINATED
            assert got.state_message == "expired at its deadline"
        with pytest.raises(grpc.RpcError) as err:
            svc.instances.SetInstanceTimeout(
                instance_pb2.SetInstanceTimeoutRequest(
                    instance_id=short.instance_id, timeout=duration_pb2.Duration(seconds=20)
                ),
                metadata=meta(),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"instance {short.instance_id} is TERMINATED" in (err.value.details() or "")
