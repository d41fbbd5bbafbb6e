"""instance_svc's messages to a tenant name the instance and the condition, never a host path.

A runtime failure's text (tar's, bubblewrap's, the agent's log tail) names files under the
platform's state directory; the tenant reads it in `state_message` or in an error's details.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from cyberdesk_proto.v1 import instance_pb2
from tests.instance_svc.conftest import meta, running

FAILED = instance_pb2.INSTANCE_STATE_FAILED


def _no_host_path(message: str, state: Path) -> None:
    assert message, "the tenant was told nothing"
    assert str(state) not in message and str(state.resolve()) not in message, message
    assert "/tmp/" not in message and str(Path.home()) + "/" not in message, message


def test_a_restore_that_fails_names_no_path_of_the_state_directory(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url) as svc:
        stub = svc.instances
        src = stub.CreateInstance(instance_pb2.CreateInstanceRequest(), metadata=meta(), timeout=60).instance
        snap = stub.CreateSnapshot(
            instance_pb2.CreateSnapshotRequest(instance_id=src.instance_id), metadata=meta(), timeout=60
        ).snapshot
        (archive,) = (svc.state / "snapshots").glob(f"{snap.snapshot_id}*")
        archive.write_bytes(b"not a snapshot archive at all")  # the disk lost it
        try:
            copy = stub.CreateInstance(
                instance_pb2.CreateInstanceRequest(snapshot_id=snap.snapshot_id), metadata=meta(), timeout=60
            ).instance
            assert copy.state == FAILED
            message = copy.state_message
        except grpc.RpcError as err:
            message = err.details() or ""
        assert "could not start" in message or "snapshot" in message, message
        _no_host_path(message, svc.state)
        listed = stub.ListInstances(instance_pb2.ListInstancesRequest(), metadata=meta(), timeout=10)
        for inst in listed.instances:
            if inst.state == FAILED:
                _no_host_path(inst.state_message, svc.state)
