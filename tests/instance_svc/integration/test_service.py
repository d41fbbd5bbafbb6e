"""instance_svc as a real process: real sandboxes, real Redis, a real gRPC client."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
from google.protobuf import duration_pb2

from cyberdesk_proto.internal.v1 import routing_pb2
from cyberdesk_proto.v1 import instance_pb2
from tests.instance_svc.conftest import TOKEN, _remove_sandboxes, meta, running
from tests.support.procs import free_port

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
        assert svc.exec(created.instance_id, "echo $GREETING from $(hostname)") == (
            0,
            f"hi from {created.instance_id}\n".encode(),
        )
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


def test_pause_at_the_deadline_then_resume_gets_a_new_deadline(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url) as svc:
        created = svc.instances.CreateInstance(
            instance_pb2.CreateInstanceRequest(
                timeout=duration_pb2.Duration(seconds=2), timeout_action=instance_pb2.TIMEOUT_ACTION_PAUSE
            ),
            metadata=meta(),
            timeout=60,
        ).instance
        paused = _wait_state(svc, created.instance_id, instance_pb2.INSTANCE_STATE_PAUSED)
        assert paused.state == instance_pb2.INSTANCE_STATE_PAUSED
        assert paused.state_message == "paused at its deadline"
        assert svc.resolve(created.instance_id).agent_target == ""  # nothing to exec into while frozen
        resumed = svc.instances.ResumeInstance(
            instance_pb2.ResumeInstanceRequest(instance_id=created.instance_id), metadata=meta(), timeout=30
        ).instance
        assert resumed.state == RUNNING
        assert resumed.expire_time.ToMicroseconds() > paused.expire_time.ToMicroseconds()
        assert svc.agent_info(created.instance_id).instance_id == created.instance_id


def test_kill9_then_restart_readopts_and_keeps_the_deadline(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url) as svc:
        keep = svc.instances.CreateInstance(instance_pb2.CreateInstanceRequest(), metadata=meta(), timeout=60).instance
        expiring = svc.instances.CreateInstance(
            instance_pb2.CreateInstanceRequest(timeout=duration_pb2.Duration(seconds=4)), metadata=meta(), timeout=60
        ).instance
        svc.exec(keep.instance_id, "echo kept > /tmp/mark")
        svc.kill9()
        time.sleep(0.5)  # let the deadline of `expiring` pass, maybe, while nobody watches
        svc.start()
        assert svc.exec(keep.instance_id, "cat /tmp/mark") == (0, b"kept\n")
        assert _wait_state(svc, expiring.instance_id, TERMINATED).state == TERMINATED
        got = _wait_state(svc, keep.instance_id, RUNNING)
        assert got.state == RUNNING and got.expire_time == keep.expire_time
        # A graceful stop (SIGTERM) keeps the sandboxes too.
        svc.stop()
        assert svc.proc is not None and svc.proc.returncode == 0
        svc.start()
        assert svc.exec(keep.instance_id, "cat /tmp/mark") == (0, b"kept\n")
    assert "re-adopted" in svc.log()


def test_vanished_sandbox_is_failed_and_orphans_are_deleted(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url) as svc:
        lost = svc.instances.CreateInstance(instance_pb2.CreateInstanceRequest(), metadata=meta(), timeout=60).instance
        svc.kill9()
        # The sandbox disappears while instance_svc is down (host reboot, OOM killer, an operator).
        _remove_sandboxes(svc.state)
        svc.start()
        got = _wait_state(svc, lost.instance_id, instance_pb2.INSTANCE_STATE_FAILED)
        assert got.state == instance_pb2.INSTANCE_STATE_FAILED
        assert got.state_message == "the sandbox's files were gone when instance_svc restarted"


def test_fifty_racing_creates_against_a_quota_of_ten(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url, quota_instances="10") as svc:
        stub = svc.instances

        def create(i: int) -> instance_pb2.Instance | grpc.RpcError:
            try:
                return stub.CreateInstance(
                    instance_pb2.CreateInstanceRequest(labels={"n": str(i)}), metadata=meta("race"), timeout=110
                ).instance
            except grpc.RpcError as err:
                return err

        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(create, range(50)))
        won = [r for r in results if isinstance(r, instance_pb2.Instance)]
        lost = [r for r in results if isinstance(r, grpc.RpcError)]
        assert len(won) == 10 and len(lost) == 40
        assert all(r.state == RUNNING for r in won), [r.state_message for r in won]
        assert {e.code() for e in lost} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert {e.details() for e in lost} == {"tenant race has 10 of 10 concurrent instances"}
        # Deleting one frees exactly one slot.
        stub.DeleteInstance(
            instance_pb2.DeleteInstanceRequest(instance_id=won[0].instance_id), metadata=meta("race"), timeout=60
        )
        assert create(99).state == RUNNING  # type: ignore[union-attr]
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateInstance(instance_pb2.CreateInstanceRequest(), metadata=meta("race"), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_snapshot_round_trip_and_pause_resume(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url) as svc:
        stub = svc.instances
        src = stub.CreateInstance(instance_pb2.CreateInstanceRequest(), metadata=meta(), timeout=60).instance
        svc.exec(src.instance_id, "mkdir -p ~/work && echo precious > ~/work/data.txt")
        paused = stub.PauseInstance(
            instance_pb2.PauseInstanceRequest(instance_id=src.instance_id), metadata=meta(), timeout=30
        ).instance
        assert paused.state == instance_pb2.INSTANCE_STATE_PAUSED
        with pytest.raises(grpc.RpcError) as err:
            stub.PauseInstance(instance_pb2.PauseInstanceRequest(instance_id=src.instance_id), metadata=meta())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"instance {src.instance_id} is PAUSED; only a RUNNING instance can be paused" == err.value.details()
        assert svc.resolve(src.instance_id).state == instance_pb2.INSTANCE_STATE_PAUSED
        resumed = stub.ResumeInstance(
            instance_pb2.ResumeInstanceRequest(instance_id=src.instance_id), metadata=meta(), timeout=30
        ).instance
        assert resumed.state == RUNNING
        with pytest.raises(grpc.RpcError) as err:
            stub.ResumeInstance(instance_pb2.ResumeInstanceRequest(instance_id=src.instance_id), metadata=meta())
        assert err.value.details() == f"instance {src.instance_id} is RUNNING; only a PAUSED instance can be resumed"

        snap = stub.CreateSnapshot(
            instance_pb2.CreateSnapshotRequest(instance_id=src.instance_id, display_name="v1"),
            metadata=meta(),
            timeout=60,
        ).snapshot
        assert snap.size_bytes > 0 and not snap.includes_memory and snap.template == "base"
        assert (
            stub.GetSnapshot(instance_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id), metadata=meta()).snapshot
            == snap
        )
        listed = stub.ListSnapshots(instance_pb2.ListSnapshotsRequest(instance_id=src.instance_id), metadata=meta())
        assert [s.snapshot_id for s in listed.snapshots] == [snap.snapshot_id]
        with pytest.raises(grpc.RpcError) as err:
            stub.GetSnapshot(instance_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id), metadata=meta("t2"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateInstance(instance_pb2.CreateInstanceRequest(snapshot_id=snap.snapshot_id), metadata=meta("t2"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        copy = stub.CreateInstance(
            instance_pb2.CreateInstanceRequest(snapshot_id=snap.snapshot_id), metadata=meta(), timeout=60
        ).instance
        assert copy.state == RUNNING and copy.source_snapshot_id == snap.snapshot_id
        assert svc.exec(copy.instance_id, "cat ~/work/data.txt") == (0, b"precious\n")

        stub.DeleteSnapshot(instance_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), metadata=meta())
        with pytest.raises(grpc.RpcError) as err:
            stub.GetSnapshot(instance_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id), metadata=meta())
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert not list((svc.state / "snapshots").glob("*.tar"))


def test_warm_pool_claim_and_refill(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url, warm_pool="base=2") as svc:
        base = svc.state / "instances"

        def pooled() -> set[str]:
            return {p.name for p in base.glob("p-*")}

        deadline = time.monotonic() + 60
        while len(pooled()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        before = pooled()
        assert len(before) == 2
        created = svc.instances.CreateInstance(
            instance_pb2.CreateInstanceRequest(env={"FROM_POOL": "yes"}), metadata=meta(), timeout=60
        ).instance
        assert created.state == RUNNING
        assert svc.exec(created.instance_id, "echo $FROM_POOL") == (0, b"yes\n")
        assert svc.agent_info(created.instance_id).instance_id == created.instance_id
        # The instance runs in a sandbox that was started before it existed.
        claimed = {p for p in before if f"/{p}/" in svc.resolve(created.instance_id).agent_target}
        assert len(claimed) == 1
        deadline = time.monotonic() + 60
        while len(pooled() - claimed) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(pooled() - claimed) == 2  # refilled
        # A shape the pool was not started with starts cold.
        big = svc.instances.CreateInstance(
            instance_pb2.CreateInstanceRequest(vcpus=2), metadata=meta(), timeout=60
        ).instance
        assert big.state == RUNNING and (base / ("sb-" + big.instance_id[2:])).exists()


def test_events_reach_the_redis_stream_and_watchers(tmp_path: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with running(tmp_path, redis_url) as svc:
        seen: list[instance_pb2.WatchInstancesResponse] = []
        stream = svc.instances.WatchInstances(instance_pb2.WatchInstancesRequest(), metadata=meta("w"), timeout=60)

        def consume() -> None:
            for item in stream:
                seen.append(item)
                if item.instance.state == TERMINATED:
                    return

        with ThreadPoolExecutor(1) as pool:
            watcher = pool.submit(consume)
            time.sleep(1.0)  # the watcher reads from `$`: let it subscribe first
            created = svc.instances.CreateInstance(
                instance_pb2.CreateInstanceRequest(), metadata=meta("w"), timeout=60
            ).instance
            svc.instances.CreateInstance(instance_pb2.CreateInstanceRequest(), metadata=meta("other"), timeout=60)
            svc.instances.DeleteInstance(
                instance_pb2.DeleteInstanceRequest(instance_id=created.instance_id), metadata=meta("w"), timeout=60
            )
            watcher.result(60)
        stream.cancel()
        assert [(e.previous_state, e.instance.state) for e in seen] == [
            (0, instance_pb2.INSTANCE_STATE_PENDING),
            (instance_pb2.INSTANCE_STATE_PENDING, instance_pb2.INSTANCE_STATE_STARTING),
            (instance_pb2.INSTANCE_STATE_STARTING, RUNNING),
            (RUNNING, instance_pb2.INSTANCE_STATE_STOPPING),
            (instance_pb2.INSTANCE_STATE_STOPPING, TERMINATED),
        ]
        entries = [f for _, f in client.xrange("cyberdesk:events") if f["instance_id"] == created.instance_id]
        assert [f["new_state"] for f in entries] == ["PENDING", "STARTING", "RUNNING", "STOPPING", "TERMINATED"]
        first = entries[0]
        assert first["tenant"] == "w" and first["vcpus"] == "1" and first["memory_mib"] == "512"
        assert first["template"] == "base" and first["old_state"] == "" and int(first["time_us"]) > 0
        assert len({f["event_id"] for f in entries}) == 5
    client.close()


def test_events_wait_in_the_outbox_while_redis_is_down(tmp_path: Path, redis_url: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with running(tmp_path, dead) as svc:
        created = svc.instances.CreateInstance(
            instance_pb2.CreateInstanceRequest(), metadata=meta(), timeout=60
        ).instance
        assert created.state == RUNNING
        svc.stop()
        svc.env["REDIS_URL"] = redis_url  # Redis is back
        svc.start()
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        deadline = time.monotonic() + 30
        states: list[str] = []
        while len(states) < 3 and time.monotonic() < deadline:
            states = [
                f["new_state"] for _, f in client.xrange("cyberdesk:events") if f["instance_id"] == created.instance_id
            ]
            time.sleep(0.1)
        client.close()
        assert states == ["PENDING", "STARTING", "RUNNING"]
    assert "redis unreachable" in svc.log()


@pytest.mark.parametrize(
    ("metadata", "code", "message"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "missing x-cyberdesk-internal-token"),
        (
            (("x-cyberdesk-internal-token", "wrong"), ("x-cyberdesk-tenant", "t1")),
            grpc.StatusCode.UNAUTHENTICATED,
            "not valid",
        ),
        ((("x-cyberdesk-internal-token", TOKEN),), grpc.StatusCode.INVALID_ARGUMENT, "missing x-cyberdesk-tenant"),
    ],
)
def test_callers_without_the_internal_token_or_tenant(
    tmp_path: Path, redis_url: str, metadata: tuple[tuple[str, str], ...], code: grpc.StatusCode, message: str
) -> None:
    with running(tmp_path, redis_url) as svc:
        with pytest.raises(grpc.RpcError) as err:
            svc.instances.ListInstances(instance_pb2.ListInstancesRequest(), metadata=metadata, timeout=10)
        assert err.value.code() == code and message in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            svc.routing.ResolveInstance(
                routing_pb2.ResolveInstanceRequest(tenant_id="t1", instance_id="i-x"),
                metadata=metadata[:1] if metadata and metadata[0][1] == TOKEN else metadata,
                timeout=10,
            )
        if code == grpc.StatusCode.UNAUTHENTICATED:
            assert err.value.code() == code
        else:
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_inputs_get_precise_statuses_and_lists_page(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url) as svc:
        stub = svc.instances
        bad = [
            (instance_pb2.CreateInstanceRequest(template="nope"), "template 'nope' is unknown"),
            (instance_pb2.CreateInstanceRequest(vcpus=1000), "vcpus must be between 1 and 8"),
            (instance_pb2.CreateInstanceRequest(memory_mib=1), "memory_mib must be between 128"),
            (instance_pb2.CreateInstanceRequest(timeout=duration_pb2.Duration(seconds=100000)), "timeout"),
            (instance_pb2.CreateInstanceRequest(env={"A B": "x"}), "env: 'A B'"),
            (instance_pb2.CreateInstanceRequest(labels={"UPPER": "x"}), "labels: key 'UPPER'"),
        ]
        for request, message in bad:
            with pytest.raises(grpc.RpcError) as err:
                stub.CreateInstance(request, metadata=meta(), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            stub.ListInstances(instance_pb2.ListInstancesRequest(page_token="garbage"), metadata=meta(), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            stub.GetInstance(instance_pb2.GetInstanceRequest(instance_id="i-000000000000"), metadata=meta(), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            stub.GetInstance(instance_pb2.GetInstanceRequest(), metadata=meta(), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # Idempotency: the same request_id gives the same instance.
        one = stub.CreateInstance(
            instance_pb2.CreateInstanceRequest(request_id="req-1", labels={"team": "a"}), metadata=meta(), timeout=60
        ).instance
        two = stub.CreateInstance(
            instance_pb2.CreateInstanceRequest(request_id="req-1", labels={"team": "a"}), metadata=meta(), timeout=60
        ).instance
        assert one.instance_id == two.instance_id
        three = stub.CreateInstance(
            instance_pb2.CreateInstanceRequest(labels={"team": "b"}), metadata=meta(), timeout=60
        ).instance
        page = stub.ListInstances(instance_pb2.ListInstancesRequest(page_size=1), metadata=meta(), timeout=10)
        assert [i.instance_id for i in page.instances] == [three.instance_id] and page.next_page_token
        page2 = stub.ListInstances(
            instance_pb2.ListInstancesRequest(page_size=1, page_token=page.next_page_token), metadata=meta(), timeout=10
        )
        assert [i.instance_id for i in page2.instances] == [one.instance_id] and not page2.next_page_token
        team_a = stub.ListInstances(instance_pb2.ListInstancesRequest(labels={"team": "a"}), metadata=meta())
        assert [i.instance_id for i in team_a.instances] == [one.instance_id]
        running_only = stub.ListInstances(
            instance_pb2.ListInstancesRequest(states=[instance_pb2.INSTANCE_STATE_TERMINATED]), metadata=meta()
        )
        assert list(running_only.instances) == []
        assert list(stub.ListInstances(instance_pb2.ListInstancesRequest(), metadata=meta("t2")).instances) == []
        with pytest.raises(grpc.RpcError) as err:
            next(
                stub.WatchInstances(
                    instance_pb2.WatchInstancesRequest(instance_id=one.instance_id), metadata=meta("t2")
                )
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_watch_outlives_idle_periods_longer_than_the_redis_socket_timeout(tmp_path: Path, redis_url: str) -> None:
    # redis-py times a blocked read out after 5 s by default; an idle watch must not turn into INTERNAL.
    with running(tmp_path, redis_url) as svc:
        stream = svc.instances.WatchInstances(instance_pb2.WatchInstancesRequest(), metadata=meta("idle"), timeout=60)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(lambda: next(stream))
            time.sleep(6.5)
            created = svc.instances.CreateInstance(
                instance_pb2.CreateInstanceRequest(), metadata=meta("idle"), timeout=60
            ).instance
            event = first.result(30)
        stream.cancel()
        assert event.instance.instance_id == created.instance_id
        assert event.instance.state == instance_pb2.INSTANCE_STATE_PENDING
