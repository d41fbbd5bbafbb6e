"""The lifecycle (instance_svc/lifecycle.py) driven in-process: a fake Runtime, a fake clock, a real store.

What is checked here is the orchestration: which state each operation ends in, what it asks of
the runtime, what it refuses and with which status, when deadlines fire. The runtime itself is
tested with real sandboxes in tests/instance_svc/integration/runtime, the whole service as a
process in tests/instance_svc/integration/test_service.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from cyberdesk_common.status import RpcError
from instance_svc.expiry import US, TimeoutAction
from instance_svc.lifecycle import INTERRUPTED, STACK_STOPPED, VANISHED, Lifecycle
from instance_svc.pool import WarmPool
from instance_svc.quotas import Limits, QuotaTable
from instance_svc.runtime.base import RuntimeError_, SandboxSpec
from instance_svc.states import State
from instance_svc.store import InstanceRecord, Store
from instance_svc.validation import CreateSpec
from tests.instance_svc.fakes import FakeClock, FakePublisher, FakeRuntime, settle

SPEC = CreateSpec(template="base", vcpus=1, memory_mib=512, timeout_us=300 * US, timeout_action=TimeoutAction.TERMINATE)


@dataclass
class World:
    """A started Lifecycle and the fakes around it."""

    lifecycle: Lifecycle
    runtime: FakeRuntime
    clock: FakeClock
    publisher: FakePublisher
    store: Store


@asynccontextmanager
async def _world(
    tmp: Path,
    runtime: FakeRuntime | None = None,
    limits: Limits | None = None,
    clock: FakeClock | None = None,
) -> AsyncIterator[World]:
    runtime = runtime or FakeRuntime()
    clock = clock or FakeClock()
    publisher = FakePublisher()
    store = Store(tmp / "instance_svc.db")
    lifecycle = Lifecycle(
        store=store,
        runtime=runtime,
        quotas=QuotaTable(limits or Limits()),
        publisher=publisher,
        pool=WarmPool(runtime, {}),
        snapshot_dir=tmp / "snapshots",
        clock=clock,
    )
    lifecycle.outbox_wait_steps = 0  # the fake publisher never empties the outbox
    await lifecycle.start()
    try:
        yield World(lifecycle, runtime, clock, publisher, store)
    finally:
        await lifecycle.stop()
        store.close()


def _run(
    tmp: Path,
    scenario: Callable[[World], Awaitable[None]],
    runtime: FakeRuntime | None = None,
    limits: Limits | None = None,
) -> None:
    async def main() -> None:
        async with _world(tmp, runtime=runtime, limits=limits) as world:
            await scenario(world)

    asyncio.run(main())


def _events(store: Store, instance_id: str) -> list[tuple[State | None, State]]:
    return [(e.old_state, e.new_state) for _, e in store.unsent() if e.instance_id == instance_id]


def _state(world: World, instance_id: str) -> InstanceRecord:
    rec = world.store.get(instance_id)
    assert rec is not None
    return rec


def test_create_starts_a_sandbox_and_returns_the_instance_running(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        spec = replace(SPEC, env={"GREETING": "hi"}, labels={"team": "a"}, vcpus=2, memory_mib=1024)
        rec = await w.lifecycle.create("t1", spec)
        assert rec.state is State.RUNNING and rec.state_message == ""
        assert rec.runtime == "fake" and rec.labels == {"team": "a"}
        assert rec.expire_time_us == w.clock.now_us() + 300 * US == rec.create_time_us + 300 * US
        box = w.runtime.sandboxes[rec.sandbox_id]
        assert box.spec.instance_id == rec.id and box.spec.env == {"GREETING": "hi"}
        assert (box.spec.vcpus, box.spec.memory_mib) == (2, 1024)
        assert rec.limits == [("memory_bytes", 1024 << 20, "cgroup"), ("vcpus", 2, "cgroup")]
        # Every state change is in the outbox and the publisher was told about it.
        assert _events(w.store, rec.id) == [
            (None, State.PENDING),
            (State.PENDING, State.STARTING),
            (State.STARTING, State.RUNNING),
        ]
        assert w.publisher.started and w.publisher.kicks >= 3
        assert w.lifecycle.scheduler.deadline(rec.id) == rec.expire_time_us
        resolved = w.lifecycle.resolve("t1", rec.id)
        assert resolved.sandbox is not None and resolved.sandbox.endpoint.token == f"token-{rec.sandbox_id}"
        # Another tenant's instance does not exist for the caller.
        with pytest.raises(RpcError) as err:
            w.lifecycle.resolve("t2", rec.id)
        assert err.value.code == grpc.StatusCode.NOT_FOUND and err.value.message == f"instance {rec.id} not found"

    _run(tmp_path, scenario)


def test_a_retried_request_id_returns_the_first_instance(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        first = await w.lifecycle.create("t1", replace(SPEC, request_id="r1"))
        again = await w.lifecycle.create("t1", replace(SPEC, request_id="r1"))
        assert again.id == first.id and again.state is State.RUNNING
        assert [op for op, _ in w.runtime.calls] == ["create"]  # started once

    _run(tmp_path, scenario)


def test_pause_and_resume(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        rec = await w.lifecycle.create("t1", SPEC)
        paused = await w.lifecycle.pause("t1", rec.id)
        assert paused.state is State.PAUSED and paused.state_message == "paused"
        assert w.runtime.sandboxes[rec.sandbox_id].paused
        assert w.lifecycle.resolve("t1", rec.id).sandbox is None  # nothing to exec into while frozen
        with pytest.raises(RpcError) as err:
            await w.lifecycle.pause("t1", rec.id)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.message == f"instance {rec.id} is PAUSED; only a RUNNING instance can be paused"

        resumed = await w.lifecycle.resume("t1", rec.id)
        assert resumed.state is State.RUNNING and not w.runtime.sandboxes[rec.sandbox_id].paused
        assert resumed.expire_time_us == rec.expire_time_us  # a deadline still ahead is kept
        with pytest.raises(RpcError) as err:
            await w.lifecycle.resume("t1", rec.id)
        assert err.value.message == f"instance {rec.id} is RUNNING; only a PAUSED instance can be resumed"
        assert [op for op, _ in w.runtime.calls] == ["create", "pause", "resume"]

    _run(tmp_path, scenario)


def test_pause_where_the_runtime_cannot_is_a_failed_precondition(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        rec = await w.lifecycle.create("t1", SPEC)
        with pytest.raises(RpcError) as err:
            await w.lifecycle.pause("t1", rec.id)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.message == "the fake runtime cannot pause instances on this host"
        assert _state(w, rec.id).state is State.RUNNING

    _run(tmp_path, scenario, runtime=FakeRuntime(supports_pause=False))


def test_delete_terminates_once_and_frees_the_sandbox(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        rec = await w.lifecycle.create("t1", SPEC)
        with pytest.raises(RpcError) as err:
            await w.lifecycle.delete("t2", rec.id)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        deleted = await w.lifecycle.delete("t1", rec.id)
        assert deleted.state is State.TERMINATED and deleted.state_message == "deleted"
        assert deleted.end_time_us == w.clock.now_us()
        assert rec.sandbox_id not in w.runtime.sandboxes
        assert w.lifecycle.scheduler.deadline(rec.id) is None
        again = await w.lifecycle.delete("t1", rec.id)  # a no-op success
        assert again == deleted
        assert [op for op, _ in w.runtime.calls] == ["create", "delete"]
        assert _events(w.store, rec.id)[-2:] == [(State.RUNNING, State.STOPPING), (State.STOPPING, State.TERMINATED)]

    _run(tmp_path, scenario)


def test_a_runtime_that_cannot_delete_leaves_the_instance_failed(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        rec = await w.lifecycle.create("t1", SPEC)
        w.runtime.fail_next["delete"] = RuntimeError_("device busy")
        ended = await w.lifecycle.delete("t1", rec.id)
        assert ended.state is State.FAILED
        assert ended.state_message == "the runtime could not delete the sandbox: device busy"

    _run(tmp_path, scenario)


def test_the_deadline_terminates_when_the_fake_clock_reaches_it(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        rec = await w.lifecycle.create("t1", replace(SPEC, timeout_us=10 * US))
        await w.clock.advance(9.999)
        assert _state(w, rec.id).state is State.RUNNING
        await w.clock.advance(0.001)
        await settle(until=lambda: _state(w, rec.id).state is State.TERMINATED)
        ended = _state(w, rec.id)
        assert ended.state_message == "expired at its deadline" and ended.end_time_us == rec.expire_time_us
        assert rec.sandbox_id not in w.runtime.sandboxes

    _run(tmp_path, scenario)


def test_set_timeout_moves_the_deadline_from_now(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        rec = await w.lifecycle.create("t1", replace(SPEC, timeout_us=10 * US))
        await w.clock.advance(5)
        moved = await w.lifecycle.set_timeout("t1", rec.id, 60 * US)
        assert moved.expire_time_us == w.clock.now_us() + 60 * US and moved.timeout_us == 60 * US
        await w.clock.advance(59)  # 64 s after create: the old deadline has long passed
        assert _state(w, rec.id).state is State.RUNNING
        await w.clock.advance(1)
        await settle(until=lambda: _state(w, rec.id).state is State.TERMINATED)
        with pytest.raises(RpcError) as err:
            await w.lifecycle.set_timeout("t1", rec.id, 20 * US)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"instance {rec.id} is TERMINATED" in err.value.message
        with pytest.raises(RpcError) as err:
            await w.lifecycle.set_timeout("t1", rec.id, US - 1)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "timeout must be between" in err.value.message

    _run(tmp_path, scenario)


def test_pause_at_the_deadline_then_resume_gets_a_fresh_timeout(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        spec = replace(SPEC, timeout_us=10 * US, timeout_action=TimeoutAction.PAUSE)
        rec = await w.lifecycle.create("t1", spec)
        await w.clock.advance(10)
        await settle(until=lambda: _state(w, rec.id).state is State.PAUSED)
        assert _state(w, rec.id).state_message == "paused at its deadline"
        assert w.runtime.sandboxes[rec.sandbox_id].paused
        await w.clock.advance(100)  # the deadline keeps counting while paused; nothing more happens
        assert _state(w, rec.id).state is State.PAUSED
        resumed = await w.lifecycle.resume("t1", rec.id)
        assert resumed.state is State.RUNNING and resumed.expire_time_us == w.clock.now_us() + 10 * US
        await w.clock.advance(10)
        await settle(until=lambda: _state(w, rec.id).state is State.PAUSED)

    _run(tmp_path, scenario)


def test_pause_at_the_deadline_terminates_where_the_runtime_cannot_pause(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        rec = await w.lifecycle.create("t1", replace(SPEC, timeout_us=10 * US, timeout_action=TimeoutAction.PAUSE))
        await w.clock.advance(10)
        await settle(until=lambda: _state(w, rec.id).state is State.TERMINATED)
        assert _state(w, rec.id).state_message == "expired at its deadline"
        assert "pause" not in [op for op, _ in w.runtime.calls]

    _run(tmp_path, scenario, runtime=FakeRuntime(supports_pause=False))


def test_a_runtime_failure_leaves_the_instance_failed_with_the_reason_and_frees_the_quota(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        w.runtime.fail_next["create"] = RuntimeError_("bubblewrap did not start sandbox: no room")
        failed = await w.lifecycle.create("t1", SPEC)
        assert failed.state is State.FAILED
        reason = "the runtime could not start the instance: bubblewrap did not start sandbox: no room"
        assert failed.state_message == reason
        # The half-started sandbox is cleaned up, and nothing is armed for a failed instance.
        assert [op for op, _ in w.runtime.calls] == ["create", "delete"]
        assert w.lifecycle.scheduler.deadline(failed.id) is None
        assert _events(w.store, failed.id)[-1] == (State.STARTING, State.FAILED)
        # Its quota slot (the only one) is free again at once.
        second = await w.lifecycle.create("t1", SPEC)
        assert second.state is State.RUNNING

    _run(tmp_path, scenario, limits=Limits(instances=1))


def test_quota_refusal_is_resource_exhausted_and_starts_nothing(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        first = await w.lifecycle.create("t1", SPEC)
        with pytest.raises(RpcError) as err:
            await w.lifecycle.create("t1", SPEC)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.message == "tenant t1 has 1 of 1 concurrent instances"
        with pytest.raises(RpcError) as err:
            await w.lifecycle.create("t2", replace(SPEC, vcpus=3))
        assert err.value.message == "tenant t2 uses 0 of 2 vCPUs; 3 more do not fit"
        assert [op for op, _ in w.runtime.calls] == ["create"]
        # Quotas count live instances only: a deleted one frees its slot.
        await w.lifecycle.delete("t1", first.id)
        assert (await w.lifecycle.create("t1", SPEC)).state is State.RUNNING

    _run(tmp_path, scenario, limits=Limits(instances=1, vcpus=2))


def test_snapshot_records_the_archive_and_delete_removes_it(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        rec = await w.lifecycle.create("t1", SPEC)
        snap = await w.lifecycle.snapshot("t1", rec.id, "v1")
        assert snap.instance_id == rec.id and snap.template == "base" and not snap.includes_memory
        archive = tmp_path / "snapshots" / f"{snap.id}.tar"
        assert snap.path == str(archive) and (await asyncio.to_thread(archive.stat)).st_size == snap.size_bytes
        assert _state(w, rec.id).state is State.RUNNING  # the instance keeps its state
        with pytest.raises(RpcError) as err:
            w.lifecycle.owned_snapshot("t2", snap.id)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        w.lifecycle.delete_snapshot("t1", snap.id)
        assert not await asyncio.to_thread(archive.exists) and w.store.get_snapshot(snap.id) is None

        w.runtime.fail_next["snapshot"] = RuntimeError_("tar failed")
        with pytest.raises(RpcError) as err:
            await w.lifecycle.snapshot("t1", rec.id, "v2")
        assert err.value.code == grpc.StatusCode.INTERNAL
        assert err.value.message == f"the runtime could not snapshot {rec.id}: tar failed"

    _run(tmp_path, scenario)


def test_a_restart_re_adopts_fails_the_vanished_and_deletes_orphans(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    clock = FakeClock()

    async def first_run() -> tuple[str, str, str]:
        async with _world(tmp_path, runtime=runtime, clock=clock) as w:
            kept = await w.lifecycle.create("t1", SPEC)
            lost = await w.lifecycle.create("t1", SPEC)
            expiring = await w.lifecycle.create("t1", replace(SPEC, timeout_us=10 * US))
        assert runtime.closed  # stopping closes the runtime but keeps its sandboxes
        assert len(runtime.sandboxes) == 3
        runtime.vanish(lost.sandbox_id)
        await runtime.create(SandboxSpec(sandbox_id="p-orphan"))  # e.g. an idle pool sandbox
        return kept.id, lost.id, expiring.id

    kept, lost, expiring = asyncio.run(first_run())

    async def second_run() -> None:
        await clock.advance(20)  # the deadline of `expiring` passes while nobody watches
        async with _world(tmp_path, runtime=runtime, clock=clock) as w:
            assert _state(w, lost).state is State.FAILED and _state(w, lost).state_message == VANISHED
            assert w.lifecycle.resolve("t1", kept).sandbox is not None
            await settle(until=lambda: _state(w, expiring).state is State.TERMINATED)
            assert _state(w, kept).state is State.RUNNING
            assert "p-orphan" not in runtime.sandboxes

    asyncio.run(second_run())


def test_a_restart_fails_instances_whose_create_was_cut_short(tmp_path: Path) -> None:
    store = Store(tmp_path / "instance_svc.db")
    rec = InstanceRecord(
        id="i-000000000001",
        tenant="t1",
        template="base",
        vcpus=1,
        memory_mib=512,
        state=State.PENDING,
        create_time_us=FakeClock().now_us(),
        expire_time_us=FakeClock().now_us() + 300 * US,
        timeout_us=300 * US,
        timeout_action=TimeoutAction.TERMINATE,
        runtime="fake",
    )
    store.insert_within_quota(rec, Limits())
    store.transition(rec.id, State.STARTING, rec.create_time_us)
    store.close()

    async def scenario(w: World) -> None:
        ended = _state(w, rec.id)
        assert ended.state is State.FAILED and ended.state_message == INTERRUPTED

    _run(tmp_path, scenario)


def test_a_restart_deletes_the_sandbox_of_a_create_cut_short_before_failing_it(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    store = Store(tmp_path / "instance_svc.db")
    now = FakeClock().now_us()
    rec = InstanceRecord(
        id="i-000000000002",
        tenant="t1",
        template="base",
        vcpus=1,
        memory_mib=512,
        state=State.PENDING,
        create_time_us=now,
        expire_time_us=now + 300 * US,
        timeout_us=300 * US,
        timeout_action=TimeoutAction.TERMINATE,
        runtime="fake",
        sandbox_id="sb-000000000002",
        request_id="r-cut",
    )
    store.insert_within_quota(rec, Limits())
    store.transition(rec.id, State.STARTING, now)
    store.close()
    # The sandbox had started when instance_svc died; the record still says STARTING.
    asyncio.run(runtime.create(SandboxSpec(sandbox_id="sb-000000000002")))

    async def scenario(w: World) -> None:
        ended = _state(w, rec.id)
        assert ended.state is State.FAILED and ended.state_message == INTERRUPTED
        assert "sb-000000000002" not in runtime.sandboxes
        # The retry of that create gets its failure, not a second instance.
        again = await w.lifecycle.create("t1", replace(SPEC, request_id="r-cut"))
        assert again.id == rec.id and again.state is State.FAILED

    _run(tmp_path, scenario, runtime=runtime)


def test_a_sandbox_that_dies_fails_its_instance_with_the_reason_and_frees_its_slot(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        rec = await w.lifecycle.create("t1", SPEC)
        assert rec.sandbox_id in w.runtime.watches
        w.runtime.die(rec.sandbox_id, "the guest agent exited (killed by SIGKILL)")
        await settle(until=lambda: _state(w, rec.id).state is State.FAILED)
        ended = _state(w, rec.id)
        assert ended.state_message == "the guest agent exited (killed by SIGKILL)" and ended.end_time_us
        assert ("delete", rec.sandbox_id) in w.runtime.calls and rec.sandbox_id not in w.runtime.sandboxes
        assert w.lifecycle.scheduler.deadline(rec.id) is None
        assert _events(w.store, rec.id)[-1] == (State.RUNNING, State.FAILED)
        # At the quota of one instance, the slot is free again.
        assert (await w.lifecycle.create("t1", SPEC)).state is State.RUNNING

    _run(tmp_path, scenario, limits=Limits(instances=1))


def test_a_death_after_a_delete_began_changes_nothing(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        rec = await w.lifecycle.create("t1", SPEC)
        handler = w.runtime.watches[rec.sandbox_id]
        await w.lifecycle.delete("t1", rec.id)
        handler(rec.sandbox_id, "the guest agent exited (killed by SIGKILL)")  # a late report
        await settle()
        assert _state(w, rec.id).state is State.TERMINATED and _state(w, rec.id).state_message == "deleted"

    _run(tmp_path, scenario)


def test_a_create_whose_caller_goes_away_still_finishes(tmp_path: Path) -> None:
    async def scenario(w: World) -> None:
        caller = asyncio.create_task(w.lifecycle.create("t1", replace(SPEC, request_id="r-gone")))
        await settle(until=lambda: bool(w.runtime.calls))
        caller.cancel()  # the client's connection dropped
        await asyncio.gather(caller, return_exceptions=True)
        again = await w.lifecycle.create("t1", replace(SPEC, request_id="r-gone"))
        assert again.state is State.RUNNING and [op for op, _ in w.runtime.calls] == ["create"]

    _run(tmp_path, scenario)


def test_stop_with_end_instances_ends_every_live_instance(tmp_path: Path) -> None:
    async def main() -> None:
        async with _world(tmp_path) as w:
            running_ = await w.lifecycle.create("t1", SPEC)
            paused = await w.lifecycle.create("t1", SPEC)
            await w.lifecycle.pause("t1", paused.id)
            await w.lifecycle.stop(end_instances=True)
            for rec in (running_, paused):
                ended = _state(w, rec.id)
                assert ended.state is State.TERMINATED and ended.state_message == STACK_STOPPED
                assert ended.end_time_us == w.clock.now_us()
            assert w.runtime.sandboxes == {}
            assert w.publisher.stopped

    asyncio.run(main())
