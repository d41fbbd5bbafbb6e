"""instance_svc asking billing before a create or SetTimeout (instance_svc/billing.py): the lifecycle
with a fake runtime and a real store, against a real PlanService on loopback (or nothing there)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from billing_svc import plans
from billing_svc.ledger import Ledger
from billing_svc.servicer import PlanServicer
from cyberdesk_common import grpc_server
from cyberdesk_common.config import ConfigError
from cyberdesk_common.status import RpcError
from cyberdesk_proto.internal.v1 import billing_pb2_grpc
from cyberdesk_stack.processes import free_port
from instance_svc.billing import UNAVAILABLE, BillingClient, billing_mode
from instance_svc.expiry import US, TimeoutAction
from instance_svc.lifecycle import Lifecycle
from instance_svc.pool import WarmPool
from instance_svc.quotas import Limits, QuotaTable
from instance_svc.store import Store
from instance_svc.validation import CreateSpec
from tests.instance_svc.fakes import FakeClock, FakePublisher, FakeRuntime

TOKEN = "internal-" + "y" * 32
SPEC = CreateSpec(template="base", vcpus=1, memory_mib=512, timeout_us=60 * US, timeout_action=TimeoutAction.TERMINATE)


@asynccontextmanager
async def _billing(tmp: Path) -> AsyncIterator[tuple[str, Ledger]]:
    ledger = Ledger(tmp / "ledger.db")
    addr = f"127.0.0.1:{free_port()}"

    def register(server: grpc.aio.Server) -> list[str]:
        billing_pb2_grpc.add_PlanServiceServicer_to_server(PlanServicer(ledger, TOKEN), server)
        return []

    running = await grpc_server.start(grpc_server.ServerSpec("billing_test", [addr], register))
    try:
        yield addr, ledger
    finally:
        await running.stop(0)
        ledger.close()


@asynccontextmanager
async def _lifecycle(tmp: Path, billing: BillingClient, host_limits: Limits) -> AsyncIterator[Lifecycle]:
    runtime = FakeRuntime()
    store = Store(tmp / "instance_svc.db")
    lifecycle = Lifecycle(
        store=store,
        runtime=runtime,
        quotas=QuotaTable(host_limits),
        publisher=FakePublisher(),
        pool=WarmPool(runtime, {}),
        snapshot_dir=tmp / "snapshots",
        clock=FakeClock(),
        billing=billing,
    )
    lifecycle.outbox_wait_steps = 0
    await lifecycle.start()
    try:
        yield lifecycle
    finally:
        await lifecycle.stop()
        await billing.close()
        store.close()


def test_the_plan_decides_before_anything_starts_and_a_host_refusal_frees_the_reservation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _billing(tmp_path) as (addr, ledger):
            ledger.set_plan("t1", plans.named("free", max_instances=2, max_timeout_s=120), 0, "test", 0)
            client = BillingClient(addr, TOKEN, "closed")
            async with _lifecycle(tmp_path, client, Limits(instances=1)) as lc:
                first = await lc.create("t1", SPEC)
                # The host's quota (1) refuses the second; billing's reservation for it is freed.
                with pytest.raises(RpcError) as host:
                    await lc.create("t1", SPEC)
                assert (
                    host.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
                    and "tenant t1 has 1 of 1" in host.value.message
                )
                # The first is a reservation until the ledger sees its events (a fake publisher here).
                assert ledger.held("t1", 0).instances == 1
                # The plan refuses a desktop before the store or the runtime are touched.
                with pytest.raises(RpcError) as desk:
                    await lc.create("t1", CreateSpec(**{**SPEC.__dict__, "desktop": (1024, 768)}))
                assert desk.value.code is grpc.StatusCode.FAILED_PRECONDITION
                assert 'plan "free" does not include desktops' in desk.value.message
                assert len(lc.store.live()) == 1
                # SetTimeout beyond the plan's longest timeout.
                with pytest.raises(RpcError) as long:
                    await lc.set_timeout("t1", first.id, 600 * US)
                assert long.value.code is grpc.StatusCode.FAILED_PRECONDITION and "at most 120 s" in long.value.message
                await lc.set_timeout("t1", first.id, 100 * US)

    asyncio.run(scenario())


def test_billing_that_does_not_answer_refuses_when_closed_and_lets_through_when_open(tmp_path: Path) -> None:
    async def scenario() -> None:
        nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
        closed = BillingClient(nowhere, TOKEN, "closed")
        with pytest.raises(RpcError) as err:
            await closed.admit_create("t1", "i-1", 1, 512, 1024, False, 60 * US)
        assert (err.value.code, err.value.message) == (grpc.StatusCode.UNAVAILABLE, UNAVAILABLE)
        with pytest.raises(RpcError):
            await closed.admit_timeout("t1", "i-1", 60 * US)
        await closed.release("t1", "i-1")  # best effort: never raises
        await closed.close()
        opened = BillingClient(nowhere, TOKEN, "open")
        await opened.admit_create("t1", "i-1", 1, 512, 1024, False, 60 * US)
        await opened.admit_timeout("t1", "i-1", 60 * US)
        await opened.close()

    asyncio.run(scenario())


def test_the_mode_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSTANCE_SVC_BILLING", raising=False)
    assert billing_mode() == "off"
    for mode in ("closed", "open", "off"):
        monkeypatch.setenv("INSTANCE_SVC_BILLING", mode)
        assert billing_mode() == mode
    monkeypatch.setenv("INSTANCE_SVC_BILLING", "maybe")
    with pytest.raises(ConfigError, match="use closed, open or off"):
        billing_mode()
