"""Metering, plans and limits end to end: `cyberdesk up` (Redis, instance_svc with real sandboxes,
billing_svc, the gateway), driven through the SDK, REST and the CLI.

Expected usage is computed from the lifecycle events' own times as WatchInstances reports them
(the times instance_svc committed each change), with the documented rule: an interval from a to
b is billed floor(b) - floor(a) seconds. It is checked against the wall clock as well (within a
second and the scheduling slack of a loaded machine).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from cyberdesk import Cyberdesk, FailedPrecondition, InstanceEvent, NotFound, RateLimited, Unavailable
from cyberdesk_stack import processes
from tests.billing_svc.stack import BillingStack, us
from tests.cli.stack import CLI, running_stack
from tests.support.waiting import wait_until as wait_for

pytestmark = pytest.mark.sandbox

S = 1_000_000


def seconds(a: int, b: int) -> int:
    """The documented rounding rule, written out again here: whole-second marks crossed."""
    return max(0, b // S - a // S)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BillingStack]:
    """One stack for the module; each test uses tenants of its own."""
    env = {"CYBERDESK_BILLING_ENFORCE_SECONDS": "0.2", "CYBERDESK_WARM_POOL": "base=2,desktop=0"}
    with running_stack(tmp_path_factory.mktemp("billing"), extra_env=env) as running:
        billing = BillingStack.of(running)
        yield billing
        billing.close()


def _events_until(watch: Any, instance_id: str, final: str, timeout: float = 60) -> list[InstanceEvent]:
    seen: list[InstanceEvent] = []
    deadline = time.monotonic() + timeout
    for event in watch:
        if event.instance.id != instance_id:
            continue
        seen.append(event)
        if event.state == final:
            return seen
        assert time.monotonic() < deadline, f"no {final} event within {timeout} s: {[e.state for e in seen]}"
    raise AssertionError("the watch ended")


def _expected(events: list[InstanceEvent]) -> tuple[int, int]:
    """(RUNNING seconds, PAUSED seconds) from the events, by the documented rule."""
    running = paused = 0
    for here, nxt in itertools.pairwise(events):
        a, b = us(here.time), us(nxt.time)
        if here.state == "RUNNING":
            running += seconds(a, b)
        elif here.state == "PAUSED":
            paused += seconds(a, b)
    return running, paused


def _settled(client: Cyberdesk, instance_id: str) -> Any:
    """The instance's usage once the ledger has its end (the meter follows the stream)."""

    def probe() -> Any:
        report = client.usage(instance_id=instance_id)
        item = report.instances[0] if report.instances else None
        return item if item is not None and item.state == "TERMINATED" else None

    return wait_for(f"the ledger has the end of {instance_id}", probe, timeout=30)


def _rest_usage(stack: BillingStack, secret: str, instance_id: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{stack.http_endpoint}/v1/usage?instanceId={instance_id}", headers={"Authorization": f"Bearer {secret}"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        body: dict[str, Any] = json.loads(reply.read())
    return body


def _cli(stack: BillingStack, secret: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**stack.running.env, "CYBERDESK_API_KEY": secret, "CYBERDESK_ENDPOINT": stack.running.gateway}
    return subprocess.run([CLI, *args], env=env, capture_output=True, timeout=60)


def test_usage_matches_the_lifecycle_to_the_second_through_grpc_rest_and_cli(stack: BillingStack) -> None:
    client, secret = stack.tenant("t-times")
    watch = client.instances.watch()
    started = time.monotonic()
    box = client.instances.create(timeout=300, vcpus=2, memory_mib=768, disk_mib=1024)
    # Visible while it runs: the open interval is counted up to now, and grows.
    first = wait_for("usage while running", lambda: client.usage(instance_id=box.id).total.instance_seconds >= 1)
    assert first
    live = client.usage(instance_id=box.id)
    assert live.instances[0].open and live.instances[0].state == "RUNNING"
    time.sleep(1.0)
    box.pause()
    paused_at = time.monotonic()
    time.sleep(1.3)
    box.resume()
    resumed_at = time.monotonic()
    time.sleep(1.0)
    box.delete()
    ended = time.monotonic()
    events = _events_until(watch, box.id, "TERMINATED")
    watch.close()
    states = [e.state for e in events]
    assert states == ["PENDING", "STARTING", "RUNNING", "PAUSED", "RUNNING", "STOPPING", "TERMINATED"], states
    created = client.instances.get(box.id).data
    assert created.create_time is not None
    item = _settled(client, box.id)
    running, paused = _expected(events)
    assert (item.usage.instance_seconds, item.usage.paused_seconds) == (running, paused)
    assert item.usage.vcpu_seconds == 2 * running
    assert item.usage.memory_mib_seconds == 768 * running
    assert item.usage.disk_mib_seconds == 1024 * (running + paused)
    assert item.usage.paused_disk_mib_seconds == 1024 * paused
    assert item.usage.desktop_seconds == 0
    # Against the wall clock: paused for ~1.5 s; everything within the life of the test's calls.
    assert abs(paused - (resumed_at - paused_at)) <= 1.5
    assert 3 <= running + paused <= ended - started + 1

    # The same numbers through REST (int64 as strings, proto3 JSON) and the CLI.
    rest = _rest_usage(stack, secret, box.id)
    assert int(rest["total"]["instanceSeconds"]) == item.usage.instance_seconds
    assert int(rest["total"]["pausedSeconds"]) == paused
    assert int(rest["instances"][0]["usage"]["vcpuSeconds"]) == item.usage.vcpu_seconds
    cli = _cli(stack, secret, "usage", "--instance", box.id, "--json")
    assert cli.returncode == 0, cli.stderr
    printed = json.loads(cli.stdout)
    assert printed["total"]["instance_seconds"] == item.usage.instance_seconds
    assert printed["instances"][0]["usage"]["disk_mib_seconds"] == item.usage.disk_mib_seconds
    table = _cli(stack, secret, "usage", "--since", "1h")
    assert table.returncode == 0 and box.id.encode() in table.stdout, table.stderr
    # A period that ends before the instance began has none of it; an unknown instance is NOT_FOUND.
    early = client.usage(since=created.create_time.replace(year=2020), until=created.create_time.replace(year=2021))
    assert early.total.instance_seconds == 0
    with pytest.raises(NotFound):
        client.usage(instance_id="i-000000000000")


def test_plan_limits_refuse_with_the_limit_its_value_and_the_usage(stack: BillingStack) -> None:
    client, secret = stack.tenant("t-limits")
    stack.set_plan("t-limits", max_instances=1, max_timeout_s=120, desktops_allowed=False)
    plan = client.plan()
    assert (plan.name, plan.max_instances, plan.used_instances, plan.max_timeout_seconds) == ("test", 1, 0, 120)
    with client.instances.create(timeout=60) as box:
        with pytest.raises(RateLimited) as over:
            client.instances.create(timeout=60)
        assert over.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 'plan "test" allows 1 concurrent instances; tenant t-limits has 1' in over.value.message
        with pytest.raises(FailedPrecondition) as long:
            box.set_timeout(600)
        assert "at most 120 s; 600 s was asked for" in long.value.message
        box.set_timeout(100)  # within the plan
        assert client.plan().used_instances == 1
        shown = _cli(stack, secret, "plan")
        assert shown.returncode == 0 and b"instances" in shown.stdout and b"not included" in shown.stdout
        # A whole second billed before it ends: a life that crosses no second's boundary bills 0 s
        # (floor(end) - floor(start)), and one run in CI (no load) ended this block within one second.
        wait_for("a billed second", lambda: client.plan().used_monthly_instance_seconds >= 1)
    # Its end frees the slot (once metered); a desktop is not part of this plan.
    wait_for("the slot is free", lambda: client.plan().used_instances == 0)
    with pytest.raises(FailedPrecondition) as desk:
        client.instances.create(desktop=True, timeout=60)
    assert 'plan "test" does not include desktops' in desk.value.message
    with pytest.raises(FailedPrecondition) as too_long:
        client.instances.create(timeout=3600)
    assert "at most 120 s" in too_long.value.message
    # The monthly allowance: this tenant has used some seconds already; an allowance of 1 s is spent.
    assert client.plan().used_monthly_instance_seconds >= 1
    stack.set_plan("t-limits", monthly_instance_seconds=1, credit_policy=3)
    with pytest.raises(RateLimited) as spent:
        client.instances.create(timeout=60)
    assert "includes 1 instance-seconds a month; tenant t-limits has used" in spent.value.message


def test_two_creates_racing_for_the_last_slot_cannot_both_win(stack: BillingStack) -> None:
    client, _ = stack.tenant("t-race")
    stack.set_plan("t-race", max_instances=2)
    keep = client.instances.create(timeout=120)
    results: list[str] = []

    def create() -> str:
        try:
            box = client.instances.create(timeout=60)
            return box.id
        except RateLimited as err:
            return f"refused: {err.message}"

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: create(), range(4)))
    won = [r for r in results if not r.startswith("refused")]
    assert len(won) == 1, results
    assert all("allows 2 concurrent instances" in r for r in results if r.startswith("refused"))
    for instance_id in [keep.id, *won]:
        client.instances.delete(instance_id)


def test_credits_run_out_and_running_instances_are_paused_after_the_grace(stack: BillingStack) -> None:
    client, _ = stack.tenant("t-credits")
    stack.set_plan("t-credits", monthly_instance_seconds=2, credit_grace_s=1)
    box = client.instances.create(timeout=120)
    watch = client.instances.watch(box.id)
    events = _events_until(watch, box.id, "PAUSED", timeout=30)
    watch.close()
    assert events[-1].state == "PAUSED"
    plan = client.plan()
    assert plan.credits_exhausted_time is not None and plan.used_monthly_instance_seconds >= 2
    # Paused, it pays for its disk only; resuming is the tenant's call, creating is refused.
    with pytest.raises(RateLimited):
        client.instances.create(timeout=60)
    client.instances.delete(box.id)


def test_billing_killed_and_redis_restarted_mid_metering_lose_nothing(stack: BillingStack) -> None:
    client, _ = stack.tenant("t-faults")
    watch = client.instances.watch()
    box = client.instances.create(timeout=300)
    # kill -9 of billing_svc while the instance changes state: the supervisor restarts it and the
    # consumer group hands it what it had not acknowledged.
    os.kill(stack.pids()["billing_svc"], signal.SIGKILL)
    box.pause()
    box.resume()
    processes.wait_healthy(stack.billing_addr, timeout=60)
    # Redis restarted (SIGTERM: it writes its append-only file) while changes are made: they wait
    # in instance_svc's outbox and arrive once Redis is back.
    redis_pid = stack.pids()["redis"]
    os.kill(redis_pid, signal.SIGTERM)
    box.pause()
    box.resume()
    wait_for("redis restarted", lambda: stack.pids()["redis"] != redis_pid, timeout=60)
    box.delete()
    events = _events_until(watch, box.id, "TERMINATED")
    watch.close()
    item = wait_for(
        "the ledger has the end",
        lambda: next(
            (i for i in client.usage(instance_id=box.id).instances if i.state == "TERMINATED"),
            None,
        ),
        timeout=60,
    )
    running_after, paused = _expected(events)
    assert [e.state for e in events].count("PAUSED") == 2
    assert item.usage.paused_seconds == paused
    assert item.usage.instance_seconds >= running_after
    # Creating works again once billing answers (the SDK retried UNAVAILABLE meanwhile if needed).
    try:
        client.instances.create(timeout=30).delete()
    except Unavailable as err:  # pragma: no cover - a failure to report, not to hide
        pytest.fail(f"billing did not come back: {err}")
