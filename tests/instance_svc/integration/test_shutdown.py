"""What SIGTERM does to the instances: INSTANCE_SVC_ON_SHUTDOWN=end ends them, keep (the default) keeps them.

`end` is what `cyberdesk up --on-exit end` sets: every instance's sandbox is destroyed, its record
ends TERMINATED ("the stack was stopped", end time = the stop), its event reaches the stream, and
instance_svc exits by itself (the test's stop would SIGKILL it after 20 s; an exit code of 0
says it did not come to that). Nothing of the sandboxes is left on the host, counted from the host.
"""

from __future__ import annotations

import time
from pathlib import Path

import redis

from cyberdesk_common.lifecycle_events import STREAM
from cyberdesk_proto.v1 import instance_pb2
from instance_svc.lifecycle import STACK_STOPPED
from tests.instance_svc.conftest import Svc, meta, running
from tests.support import leftovers


def _create(svc: Svc) -> instance_pb2.Instance:
    request = instance_pb2.CreateInstanceRequest(disk_mib=256)
    inst = svc.instances.CreateInstance(request, metadata=meta(), timeout=120).instance
    assert inst.state == instance_pb2.INSTANCE_STATE_RUNNING, inst
    return inst


def _get(svc: Svc, instance_id: str) -> instance_pb2.Instance:
    return svc.instances.GetInstance(instance_pb2.GetInstanceRequest(instance_id=instance_id), metadata=meta()).instance


def test_sigterm_with_end_ends_every_instance_and_leaves_nothing(tmp_path: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with running(tmp_path, redis_url, environ={"INSTANCE_SVC_ON_SHUTDOWN": "end"}) as svc:
        made = [_create(svc), _create(svc)]
        paused = made[1].instance_id
        svc.instances.PauseInstance(instance_pb2.PauseInstanceRequest(instance_id=paused), metadata=meta())
        last = client.xrevrange(STREAM, count=1)
        since = str(last[0][0]) if last else "0-0"
        before_stop = time.time()
        svc.stop()
        assert svc.proc is not None and svc.proc.returncode == 0, svc.log()[-3000:]
        assert not leftovers.not_owned(svc.state / "instances", set())
        ended = {
            fields["instance_id"]: fields["state_message"]
            for _, fields in client.xrange(STREAM, min=since)
            if fields["new_state"] == "TERMINATED"
        }
        assert ended == {i.instance_id: STACK_STOPPED for i in made}

        svc.env.pop("INSTANCE_SVC_ON_SHUTDOWN")
        svc.start()
        for inst in made:
            got = _get(svc, inst.instance_id)
            assert got.state == instance_pb2.INSTANCE_STATE_TERMINATED and got.state_message == STACK_STOPPED
            assert before_stop - 1 <= got.end_time.seconds + got.end_time.nanos / 1e9 <= time.time()
    client.close()


def test_sigterm_by_default_keeps_the_instances_for_the_next_start(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url) as svc:
        inst = _create(svc)
        svc.exec(inst.instance_id, "echo kept > /tmp/mark")
        svc.stop()
        assert svc.proc is not None and svc.proc.returncode == 0
        assert leftovers.processes(svc.state / "instances"), "the sandbox stopped with instance_svc"
        svc.start()
        assert _get(svc, inst.instance_id).state == instance_pb2.INSTANCE_STATE_RUNNING
        assert svc.exec(inst.instance_id, "cat /tmp/mark") == (0, b"kept\n")
        svc.instances.DeleteInstance(instance_pb2.DeleteInstanceRequest(instance_id=inst.instance_id), metadata=meta())
