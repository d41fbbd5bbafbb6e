"""kill -9 of instance_svc in the middle of creates, execs, pauses, snapshots, deletes and warm-pool refills.

After each kill instance_svc is started again on the same state directory, and then:

* every instance is RUNNING (and usable: a command runs in it) or PAUSED, or ended with a reason;
* a create retried with its request_id returns the instance of the first attempt (or its
  failure), and no request_id has two instances;
* nothing of any sandbox exists on the host but what those RUNNING and PAUSED instances hold:
  processes, directories, cgroups, mounts and loop devices counted from /proc, /sys/fs/cgroup
  and the file system (tests/support/leftovers.py), never from instance_svc's records.

The windows are hit by doing many operations at once and killing while they run (creates take
hundreds of milliseconds each on this machine when 20 run in parallel); no hook slows the code.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc

from cyberdesk_proto.v1 import instance_pb2
from tests.faults.stack import ROOMY_QUOTAS
from tests.instance_svc.conftest import Svc, meta, running
from tests.support import leftovers

# Room for every instance of the test at once (the default quota is 10 instances, 40 GiB of disk).
_ROOMY = ROOMY_QUOTAS
T = TypeVar("T")
R = TypeVar("R")
_DISK = 256  # MiB: small disks keep 20 parallel creates cheap
_FAILED_REASONS = (
    "instance_svc restarted while the sandbox was being created",
    "the runtime could not start the instance: ",
)
_LIVE = (instance_pb2.INSTANCE_STATE_RUNNING, instance_pb2.INSTANCE_STATE_PAUSED)


def _sandbox(instance_id: str) -> str:
    return "sb-" + instance_id.removeprefix("i-")


def _create(svc: Svc, request_id: str, labels: dict[str, str]) -> instance_pb2.Instance:
    request = instance_pb2.CreateInstanceRequest(request_id=request_id, labels=labels, disk_mib=_DISK)
    return svc.instances.CreateInstance(request, metadata=meta(), timeout=120).instance


def _list(svc: Svc, labels: dict[str, str] | None = None) -> list[instance_pb2.Instance]:
    found: list[instance_pb2.Instance] = []
    token = ""
    while True:
        page = svc.instances.ListInstances(
            instance_pb2.ListInstancesRequest(labels=labels or {}, page_size=100, page_token=token),
            metadata=meta(),
            timeout=30,
        )
        found += page.instances
        token = page.next_page_token
        if not token:
            return found


def _owned(svc: Svc) -> set[str]:
    return {_sandbox(i.instance_id) for i in _list(svc) if i.state in _LIVE}


def _assert_nothing_else(svc: Svc) -> None:
    """Nothing of any sandbox on the host but what the live instances hold (waits briefly for teardown)."""
    base = svc.state / "instances"
    owned = _owned(svc)
    deadline = time.monotonic() + 15
    while (extra := leftovers.not_owned(base, owned)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not extra, f"left on the host with no live instance: {extra}\n{svc.log()[-4000:]}"


def _kill_during(svc: Svc, calls: list[Callable[[], object]], delay: float) -> list[BaseException | None]:
    """Start every call at once, kill -9 instance_svc `delay` s later; each call's error (None when it returned)."""
    pool = ThreadPoolExecutor(len(calls))
    futures: list[Future[object]] = [pool.submit(call) for call in calls]
    time.sleep(delay)
    svc.kill9()
    pool.shutdown(wait=True)
    return [f.exception() for f in futures]


def _delete(svc: Svc, instance_id: str) -> instance_pb2.Instance:
    request = instance_pb2.DeleteInstanceRequest(instance_id=instance_id)
    return svc.instances.DeleteInstance(request, metadata=meta(), timeout=60).instance


def _get(svc: Svc, instance_id: str) -> instance_pb2.Instance:
    request = instance_pb2.GetInstanceRequest(instance_id=instance_id)
    return svc.instances.GetInstance(request, metadata=meta(), timeout=30).instance


def _usable(svc: Svc, instance: instance_pb2.Instance) -> None:
    code, out = svc.exec(instance.instance_id, "echo ok")
    assert (code, out) == (0, b"ok\n"), f"{instance.instance_id}: {code} {out!r}"


def _each(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """`fn` over `items` in parallel (sandbox operations are mostly waiting)."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(fn, items))


def test_kill9_under_20_parallel_creates_and_running_execs(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url, **_ROOMY) as svc:
        worker = _create(svc, "worker", {"role": "worker"})
        assert worker.state == instance_pb2.INSTANCE_STATE_RUNNING
        for round_no, delay in enumerate((0.1, 0.3, 0.8)):
            # Commands running in an existing instance while instance_svc dies: they go on.
            execs = ThreadPoolExecutor(2)
            running_execs = [execs.submit(svc.exec, worker.instance_id, "sleep 2; echo done") for _ in range(2)]
            time.sleep(0.5)  # both resolved their agent and run
            labels = {"round": str(round_no)}
            ids = [f"r{round_no}-{n}" for n in range(20)]

            def create(rid: str, labels: dict[str, str] = labels) -> instance_pb2.Instance:
                return _create(svc, rid, {**labels, "req": rid})

            errors = _kill_during(svc, [functools.partial(create, rid) for rid in ids], delay)
            assert any(isinstance(e, grpc.RpcError) for e in errors), "the kill hit no create"
            svc.start()
            assert [f.result(30) for f in running_execs] == [(0, b"done\n")] * 2
            execs.shutdown()

            # The retry of each create (same request_id, as the SDK sends it) gets one instance.
            with ThreadPoolExecutor(len(ids)) as pool:
                retried = dict(zip(ids, pool.map(create, ids), strict=True))
                again = dict(zip(ids, (i.instance_id for i in pool.map(create, ids)), strict=True))
            assert again == {rid: inst.instance_id for rid, inst in retried.items()}
            listed = _list(svc, labels)
            assert sorted(i.labels["req"] for i in listed) == sorted(ids), "a request_id made two instances"
            failed = [i for i in retried.values() if i.state != instance_pb2.INSTANCE_STATE_RUNNING]
            for inst in failed:
                assert inst.state == instance_pb2.INSTANCE_STATE_FAILED, inst
                # Cut short by the kill, or (20 agents starting at once on a busy machine) too slow to start.
                assert inst.state_message.startswith(_FAILED_REASONS), inst
            _each(lambda i: _usable(svc, i), [worker, *(i for i in retried.values() if i not in failed)])
            _assert_nothing_else(svc)
            _each(lambda i: _delete(svc, i.instance_id), retried.values())
        _delete(svc, worker.instance_id)
        assert not leftovers.not_owned(svc.state / "instances", set())


def test_kill9_during_pauses_snapshots_pool_refills_and_deletes(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url, warm_pool="base=2", **_ROOMY) as svc:
        # The pool fills while these start.
        made = _each(lambda n: _create(svc, f"m{n}", {"n": str(n)}), range(4))
        assert all(i.state == instance_pb2.INSTANCE_STATE_RUNNING for i in made)
        ids = [i.instance_id for i in made]
        _each(lambda i: svc.exec(i, "head -c 4000000 /dev/urandom > /home/user/blob"), ids)  # archives take a while

        # Pauses and snapshots cut short: the sandboxes may be left frozen, archives half written.
        def pause(iid: str) -> object:
            return svc.instances.PauseInstance(instance_pb2.PauseInstanceRequest(instance_id=iid), metadata=meta())

        def snapshot(iid: str) -> object:
            return svc.instances.CreateSnapshot(instance_pb2.CreateSnapshotRequest(instance_id=iid), metadata=meta())

        calls = [functools.partial(pause, ids[0]), functools.partial(pause, ids[1])]
        calls += [functools.partial(snapshot, i) for i in ids[2:]]
        _kill_during(svc, calls, 0.05)

        # A restart whose warm pool is refilling (the previous pool's sandboxes are orphans now).
        svc.start()
        time.sleep(0.3)
        svc.kill9()
        svc.env["CYBERDESK_WARM_POOL"] = "base=0"
        svc.start()

        for iid in ids:
            got = _get(svc, iid)
            assert got.state in _LIVE, got
            if got.state == instance_pb2.INSTANCE_STATE_PAUSED:
                svc.instances.ResumeInstance(instance_pb2.ResumeInstanceRequest(instance_id=iid), metadata=meta())
            _usable(svc, got)  # a RUNNING instance left frozen would hang here
        snapshots = svc.instances.ListSnapshots(instance_pb2.ListSnapshotsRequest(), metadata=meta()).snapshots
        archives = sorted(p.name for p in (svc.state / "snapshots").glob("*"))
        assert archives == sorted(f"{s.snapshot_id}.tar" for s in snapshots), "an archive no snapshot record names"
        _assert_nothing_else(svc)

        # Deletes cut short: STOPPING records, sandboxes half torn down.
        _kill_during(svc, [functools.partial(_delete, svc, i) for i in ids], 0.03)
        svc.start()
        for iid in ids:
            got = _get(svc, iid)
            assert got.state in (instance_pb2.INSTANCE_STATE_TERMINATED, instance_pb2.INSTANCE_STATE_RUNNING), got
            _delete(svc, iid)
        _assert_nothing_else(svc)
        assert not leftovers.not_owned(svc.state / "instances", set())
        assert "destroyed sandboxes no record owns" in svc.log()
