"""The SDK's and the CLI's create survive a gateway restart: retried on UNAVAILABLE, exactly one instance.

Real gateway, instance_svc and sandboxes. The gateway is killed with SIGKILL, once before the
create is sent (every attempt is refused until it is back) and once while instance_svc is
creating the instance (the first attempt's answer is lost). The SDK's create (which always sends
a request_id) retries with back-off until the restarted gateway answers; the request_id makes
the retry return the instance the first attempt made. Counted afterwards by label through
ListInstances: exactly one.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from cyberdesk import Cyberdesk, CyberdeskError
from cyberdesk_proto.v1 import instance_pb2
from tests.cli.stack import CLI
from tests.faults.stack import Stack
from tests.instance_svc.conftest import meta
from tests.support import leftovers

pytestmark = pytest.mark.timeout(180)

TENANT = "t-create"


def _labelled(stack: Stack, run: str) -> list[instance_pb2.Instance]:
    """The tenant's instances labelled run=`run`, asked of instance_svc directly (the gateway may be down)."""
    reply = stack.instances.instances.ListInstances(
        instance_pb2.ListInstancesRequest(labels={"run": run}), metadata=meta(TENANT), timeout=10
    )
    return list(reply.instances)


def _create_in_thread(client: Cyberdesk, **kwargs: object) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(client.instances.create(timeout=120, **kwargs))  # type: ignore[arg-type]
        except BaseException as err:
            out.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_create_sent_while_the_gateway_is_down_succeeds_once_it_is_back(stack: Stack, key: str) -> None:
    run = uuid.uuid4().hex[:12]
    with Cyberdesk(api_key=key, endpoint=stack.gateway.addr) as client:
        stack.gateway.kill9()
        try:
            thread, out = _create_in_thread(client, labels={"run": run})
            time.sleep(2)  # a few refused attempts
            assert thread.is_alive(), f"create gave up while the gateway was down: {out}"
        finally:
            stack.gateway.start()
        thread.join(90)
        assert out and not isinstance(out[0], BaseException), out
        created = out[0]
        assert [i.instance_id for i in _labelled(stack, run)] == [created.id]  # type: ignore[attr-defined]
        client.instances.delete(created.id)  # type: ignore[attr-defined]


def test_a_create_whose_answer_is_lost_with_the_gateway_makes_one_instance(stack: Stack, key: str) -> None:
    run = uuid.uuid4().hex[:12]
    request_id = f"req-{run}"
    with Cyberdesk(api_key=key, endpoint=stack.gateway.addr) as client:
        thread, out = _create_in_thread(client, labels={"run": run}, request_id=request_id)
        deadline = time.monotonic() + 30
        while not _labelled(stack, run):  # instance_svc has the request: kill the gateway under it
            assert time.monotonic() < deadline, f"the create never reached instance_svc: {out}"
            time.sleep(0.02)
        stack.gateway.kill9()
        try:
            time.sleep(1)
        finally:
            stack.gateway.start()
        thread.join(90)
        assert out and not isinstance(out[0], BaseException), out
        created = out[0]
        assert created.state == "RUNNING"  # type: ignore[attr-defined]
        assert [i.instance_id for i in _labelled(stack, run)] == [created.id]  # type: ignore[attr-defined]
        # The same request_id again is the same instance, not a second one.
        again = client.instances.create(timeout=120, labels={"run": run}, request_id=request_id)
        assert again.id == created.id  # type: ignore[attr-defined]
        assert len(_labelled(stack, run)) == 1
        client.instances.delete(again.id)


def test_the_cli_create_waits_out_a_gateway_restart(stack: Stack, key: str) -> None:
    run = uuid.uuid4().hex[:12]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYBERDESK_")}
    env.update({"CYBERDESK_API_KEY": key, "CYBERDESK_ENDPOINT": stack.gateway.addr, "CYBERDESK_CONFIG": "/nonexistent"})
    stack.gateway.kill9()
    try:
        proc = subprocess.Popen(
            [CLI, "create", "--label", f"run={run}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        time.sleep(2)
        assert proc.poll() is None, f"the CLI gave up while the gateway was down: {proc.communicate()}"
    finally:
        stack.gateway.start()
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr.decode()
    instance_id = stdout.decode().strip()
    assert [i.instance_id for i in _labelled(stack, run)] == [instance_id]
    with Cyberdesk(api_key=key, endpoint=stack.gateway.addr) as client:
        client.instances.delete(instance_id)


def test_twenty_parallel_creates_under_a_killed_gateway_and_redis_make_twenty_usable_instances(
    stack: Stack, key: str
) -> None:
    # 20 SDK creates at once while commands run in another instance; the gateway is killed -9 under
    # them, then Redis (rate limits, the event stream), each started again a moment later. Every
    # create is retried by the SDK with its request_id: 20 instances, no more, every one RUNNING and
    # usable (or FAILED with a reason), and nothing on the host that no live instance owns, counted
    # from /proc, the cgroup tree, the mount table and the directories.
    run = uuid.uuid4().hex[:12]
    with Cyberdesk(api_key=key, endpoint=stack.gateway.addr, timeout=60) as client:
        worker = client.instances.create(timeout=300, labels={"run": run, "role": "exec"})
        stop = threading.Event()
        ran: list[int] = []

        def commands() -> None:
            while not stop.is_set():
                try:
                    ran.append(worker.exec("echo ok").exit_code)
                except CyberdeskError:  # the gateway is down for a moment: the next one goes through
                    time.sleep(0.05)

        execs = threading.Thread(target=commands, daemon=True)
        execs.start()
        with ThreadPoolExecutor(20) as pool:
            futures = [
                pool.submit(client.instances.create, timeout=300, labels={"run": run, "role": "made"})
                for _ in range(20)
            ]
            time.sleep(0.3)
            stack.gateway.kill9()
            time.sleep(0.5)
            stack.gateway.start()
            time.sleep(0.5)
            stack.redis.kill9()
            time.sleep(0.5)
            stack.redis.start()
            made = [future.result(timeout=150) for future in futures]
        before_join = len(ran)
        deadline = time.monotonic() + 60
        while len(ran) < before_join + 3:  # commands go on after both restarts
            assert time.monotonic() < deadline, "no command ran after the restarts"
            time.sleep(0.1)
        stop.set()
        execs.join(60)
        assert set(ran) == {0}
        listed = [i for i in _labelled(stack, run) if i.labels["role"] == "made"]
        assert sorted(i.instance_id for i in listed) == sorted(box.id for box in made)
        assert len({box.id for box in made}) == 20
        for instance in listed:
            if instance.state == instance_pb2.INSTANCE_STATE_FAILED:
                assert instance.state_message, f"{instance.instance_id} FAILED without a reason"
        usable = [box for box in made if box.state == "RUNNING"]
        assert usable, "every create failed"
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(lambda box: box.exec("echo ok").stdout, usable)) == {b"ok\n"}
            list(pool.map(lambda box: box.delete(), [*made, worker]))
    base = stack.instances.state / "instances"
    live = {
        "sb-" + i.instance_id.removeprefix("i-")
        for i in stack.instances.instances.ListInstances(
            instance_pb2.ListInstancesRequest(page_size=100), metadata=meta(TENANT), timeout=30
        ).instances
        if i.state in (instance_pb2.INSTANCE_STATE_RUNNING, instance_pb2.INSTANCE_STATE_PAUSED)
    }
    deadline = time.monotonic() + 20
    while (extra := leftovers.not_owned(base, live)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not extra, f"left on the host with no live instance: {extra}"
