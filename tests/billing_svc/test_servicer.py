"""billing_svc's servicers on a real gRPC server (loopback) over a real ledger file: who may call,
and bad input answered with a precise status (never a hang or a stack trace)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from billing_svc.ledger import Ledger
from billing_svc.servicer import BillingServicer, PlanServicer
from cyberdesk_common import grpc_server
from cyberdesk_common.metadata import INTERNAL_TOKEN_METADATA, internal_metadata
from cyberdesk_proto.internal.v1 import billing_pb2 as internal_pb2
from cyberdesk_proto.internal.v1 import billing_pb2_grpc as internal_grpc
from cyberdesk_proto.v1 import billing_pb2, billing_pb2_grpc
from cyberdesk_stack.processes import free_port

TOKEN = "internal-" + "x" * 32


def test_callers_and_bad_input(tmp_path: Path) -> None:
    async def scenario() -> None:
        ledger = Ledger(tmp_path / "l.db")
        addr = f"127.0.0.1:{free_port()}"

        def register(server: grpc.aio.Server) -> list[str]:
            billing_pb2_grpc.add_BillingServiceServicer_to_server(BillingServicer(ledger, TOKEN), server)
            internal_grpc.add_PlanServiceServicer_to_server(PlanServicer(ledger, TOKEN), server)
            return []

        running = await grpc_server.start(grpc_server.ServerSpec("billing_test", [addr], register))
        try:
            async with grpc.aio.insecure_channel(addr) as channel:
                usage = billing_pb2_grpc.BillingServiceStub(channel)
                plans = internal_grpc.PlanServiceStub(channel)
                tenant = internal_metadata("t1", TOKEN)

                async def code(call: object) -> tuple[grpc.StatusCode, str]:
                    try:
                        await call  # type: ignore[misc]
                    except grpc.aio.AioRpcError as err:
                        return err.code(), err.details() or ""
                    return grpc.StatusCode.OK, ""

                # No token, a wrong token, a token without a tenant.
                assert (await code(usage.GetUsage(billing_pb2.GetUsageRequest())))[0] is grpc.StatusCode.UNAUTHENTICATED
                wrong = internal_metadata("t1", "nope")
                assert (await code(usage.GetPlan(billing_pb2.GetPlanRequest(), metadata=wrong)))[
                    0
                ] is grpc.StatusCode.UNAUTHENTICATED
                bare = ((INTERNAL_TOKEN_METADATA, TOKEN),)
                got = await code(usage.GetPlan(billing_pb2.GetPlanRequest(), metadata=bare))
                assert got[0] is grpc.StatusCode.INVALID_ARGUMENT and "x-cyberdesk-tenant" in got[1]
                assert (await code(plans.AdmitCreate(internal_pb2.AdmitCreateRequest(), metadata=())))[
                    0
                ] is grpc.StatusCode.UNAUTHENTICATED

                # Bad periods, pages and instances.
                reversed_period = billing_pb2.GetUsageRequest(
                    start_time=timestamp_pb2.Timestamp(seconds=2_000_000_000),
                    end_time=timestamp_pb2.Timestamp(seconds=1_000_000_000),
                )
                got = await code(usage.GetUsage(reversed_period, metadata=tenant))
                assert got[0] is grpc.StatusCode.INVALID_ARGUMENT and "before start_time" in got[1]
                got = await code(usage.GetUsage(billing_pb2.GetUsageRequest(page_token="garbage"), metadata=tenant))
                assert got[0] is grpc.StatusCode.INVALID_ARGUMENT and "page_token" in got[1]
                got = await code(usage.GetUsage(billing_pb2.GetUsageRequest(page_size=-1), metadata=tenant))
                assert got[0] is grpc.StatusCode.INVALID_ARGUMENT
                got = await code(usage.GetUsage(billing_pb2.GetUsageRequest(instance_id="i-nope"), metadata=tenant))
                assert got[0] is grpc.StatusCode.NOT_FOUND

                # Plan changes: a plan needs a name and a positive max_timeout; tenant_id is required.
                bad_plan = internal_pb2.SetTenantPlanRequest(tenant_id="t1", plan=billing_pb2.Plan(name="x"))
                got = await code(plans.SetTenantPlan(bad_plan, metadata=bare))
                assert got[0] is grpc.StatusCode.INVALID_ARGUMENT and "max_timeout" in got[1]
                got = await code(plans.GetTenantPlan(internal_pb2.GetTenantPlanRequest(), metadata=bare))
                assert got[0] is grpc.StatusCode.INVALID_ARGUMENT and "tenant_id" in got[1]

                # A refusal is an answer naming the limit, not an error.
                one = billing_pb2.Plan(
                    name="one",
                    max_instances=1,
                    max_vcpus=4,
                    max_memory_mib=4096,
                    max_disk_mib=8192,
                    max_timeout=duration_pb2.Duration(seconds=600),
                )
                await plans.SetTenantPlan(internal_pb2.SetTenantPlanRequest(tenant_id="t1", plan=one), metadata=bare)
                admit = internal_pb2.AdmitCreateRequest(
                    tenant_id="t1",
                    instance_id="i-1",
                    vcpus=1,
                    memory_mib=512,
                    disk_mib=1024,
                    timeout=duration_pb2.Duration(seconds=60),
                )
                assert (await plans.AdmitCreate(admit, metadata=bare)).admitted
                admit.instance_id = "i-2"
                second = await plans.AdmitCreate(admit, metadata=bare)
                assert not second.admitted
                assert (second.refusal.code, second.refusal.limit, second.refusal.value, second.refusal.used) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                    "instances",
                    1,
                    1,
                )
                plan = await usage.GetPlan(billing_pb2.GetPlanRequest(), metadata=tenant)
                assert (plan.plan.name, plan.used.instances) == ("one", 1)
                assert (
                    await plans.ReleaseCreate(
                        internal_pb2.ReleaseCreateRequest(tenant_id="t1", instance_id="i-1"), metadata=bare
                    )
                ).released
        finally:
            await running.stop(0)
            ledger.close()

    asyncio.run(scenario())
