"""gRPC servicers of billing_svc: the public BillingService (behind the gateway) and the internal PlanService.

Both believe a tenant only with the internal token beside it (`cyberdesk_common.internal_auth`):
the gateway sends the tenant of the caller's key; instance_svc and the webhook path name the
tenant in the request.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from billing_svc import usage
from billing_svc.ledger import Ledger, UsageReport
from billing_svc.plans import CATALOG, CreditPolicy, Plan, Refusal
from cyberdesk_common.internal_auth import InternalAuth
from cyberdesk_common.lifecycle_events import InstanceState
from cyberdesk_common.status import invalid_argument, not_found
from cyberdesk_proto.internal.v1 import billing_pb2 as internal_pb2
from cyberdesk_proto.internal.v1 import billing_pb2_grpc as internal_grpc
from cyberdesk_proto.v1 import billing_pb2, billing_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
_log = logging.getLogger("billing_svc.servicer")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _now_us() -> int:
    return time.time_ns() // 1000


def ts(us: int) -> timestamp_pb2.Timestamp:
    """A Timestamp of microseconds since the epoch."""
    return timestamp_pb2.Timestamp(seconds=us // usage.US, nanos=(us % usage.US) * 1000)


def _us(t: timestamp_pb2.Timestamp) -> int:
    return t.seconds * usage.US + t.nanos // 1000


def usage_proto(t: usage.Totals) -> billing_pb2.Usage:
    """The `cyberdesk.v1.Usage` message of a set of totals."""
    return billing_pb2.Usage(
        instance_seconds=t.instance_seconds,
        vcpu_seconds=t.vcpu_seconds,
        memory_mib_seconds=t.memory_mib_seconds,
        memory_gib_seconds=t.memory_mib_seconds / 1024,
        desktop_seconds=t.desktop_seconds,
        paused_seconds=t.paused_seconds,
        disk_mib_seconds=t.disk_mib_seconds,
        disk_gib_seconds=t.disk_mib_seconds / 1024,
        paused_disk_mib_seconds=t.paused_disk_mib_seconds,
    )


def plan_proto(plan: Plan) -> billing_pb2.Plan:
    """The `cyberdesk.v1.Plan` message of a plan."""
    return billing_pb2.Plan(
        name=plan.name,
        max_instances=plan.max_instances,
        max_vcpus=plan.max_vcpus,
        max_memory_mib=plan.max_memory_mib,
        max_disk_mib=plan.max_disk_mib,
        monthly_instance_seconds=plan.monthly_instance_seconds,
        max_timeout=duration_pb2.Duration(seconds=plan.max_timeout_s),
        desktops_allowed=plan.desktops_allowed,
        credit_policy=plan.credit_policy.value,  # type: ignore[arg-type]
        credit_grace=duration_pb2.Duration(seconds=plan.credit_grace_s),
    )


def plan_from_proto(msg: billing_pb2.Plan) -> Plan:
    """A plan from its message; INVALID_ARGUMENT naming the field that is unusable."""
    if not msg.name:
        raise invalid_argument("plan.name is required")
    for name in ("max_instances", "max_vcpus", "max_memory_mib", "max_disk_mib", "monthly_instance_seconds"):
        if getattr(msg, name) < 0:
            raise invalid_argument(f"plan.{name} must not be negative")
    if msg.max_timeout.seconds <= 0:
        raise invalid_argument("plan.max_timeout must be positive")
    if msg.credit_grace.seconds < 0:
        raise invalid_argument("plan.credit_grace must not be negative")
    return Plan(
        name=msg.name,
        max_instances=msg.max_instances,
        max_vcpus=msg.max_vcpus,
        max_memory_mib=msg.max_memory_mib,
        max_disk_mib=msg.max_disk_mib,
        monthly_instance_seconds=msg.monthly_instance_seconds,
        max_timeout_s=msg.max_timeout.seconds,
        desktops_allowed=msg.desktops_allowed,
        credit_policy=CreditPolicy(msg.credit_policy) if msg.credit_policy else CreditPolicy.PAUSE,
        credit_grace_s=msg.credit_grace.seconds,
    )


def refusal_proto(refusal: Refusal) -> internal_pb2.Refusal:
    """The internal Refusal message."""
    return internal_pb2.Refusal(
        code=refusal.code.value[0],
        limit=refusal.limit,
        value=refusal.value,
        used=refusal.used,
        requested=refusal.requested,
        message=refusal.message,
    )


def plan_usage(ledger: Ledger, tenant: str, now_us: int) -> tuple[Plan, str, billing_pb2.PlanUsage, int]:
    """The tenant's plan, its source, what is used of each limit and the month's start."""
    plan, source = ledger.plan(tenant)
    held = ledger.held(tenant, now_us)
    month = usage.month_start_us(now_us)
    used = billing_pb2.PlanUsage(
        instances=held.instances,
        vcpus=held.vcpus,
        memory_mib=held.memory_mib,
        disk_mib=held.disk_mib,
        monthly_instance_seconds=held.monthly_instance_seconds,
        desktops=held.desktops,
    )
    exhausted = ledger.exhausted_since(tenant, now_us, exhausted=False)
    if exhausted:
        used.credits_exhausted_time.CopyFrom(ts(exhausted))
    return plan, source, used, month


def _page(token: str, size: int) -> tuple[int, int]:
    if size < 0:
        raise invalid_argument(f"page_size must not be negative, got {size}")
    size = min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not token:
        return 0, size
    try:
        kind, offset = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if kind != "usage" or not isinstance(offset, int) or offset < 0:
            raise ValueError(token)
    except (ValueError, TypeError):
        raise invalid_argument(
            "page_token is not a token returned by GetUsage; pass next_page_token unchanged or leave it empty"
        ) from None
    return offset, size


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps(["usage", offset]).encode()).decode().rstrip("=")


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    """cyberdesk.v1.BillingService, scoped to the tenant the gateway vouches for."""

    def __init__(self, ledger: Ledger, internal_token: str, now_us: Callable[[], int] = _now_us) -> None:
        self._ledger = ledger
        self._auth = InternalAuth(internal_token)
        self._now_us = now_us

    async def GetUsage(self, request: billing_pb2.GetUsageRequest, context: Context) -> billing_pb2.GetUsageResponse:
        """The tenant's usage in the period (default: this month up to now), in total and by instance."""
        tenant = self._auth.tenant(context)
        now = self._now_us()
        end = usage.floor_to_second(_us(request.end_time)) if request.HasField("end_time") else now
        end = min(end, now)
        start = (
            usage.floor_to_second(_us(request.start_time))
            if request.HasField("start_time")
            else usage.month_start_us(now)
        )
        if start < 0:
            raise invalid_argument("start_time must not be before 1970")
        if end < start:
            raise invalid_argument(
                f"end_time ({ts(end).ToJsonString()}) is before start_time ({ts(start).ToJsonString()})"
            )
        if request.instance_id and not self._ledger.knows_instance(tenant, request.instance_id):
            raise not_found(f"instance {request.instance_id} not found (the ledger has no usage of it)")
        offset, size = _page(request.page_token, request.page_size)
        report: UsageReport = self._ledger.usage(tenant, start, end, now, request.instance_id)
        page = report.instances[offset : offset + size]
        return billing_pb2.GetUsageResponse(
            start_time=ts(start),
            end_time=ts(end),
            as_of=ts(min(now, end)),
            total=usage_proto(report.total),
            instances=[
                billing_pb2.InstanceUsage(
                    instance_id=item.instance_id,
                    template=item.template,
                    vcpus=item.vcpus,
                    memory_mib=item.memory_mib,
                    disk_mib=item.disk_mib,
                    desktop=item.desktop,
                    state=item.state.value,
                    open=item.open and item.state in (InstanceState.RUNNING, InstanceState.PAUSED),
                    usage=usage_proto(item.totals),
                )
                for item in page
            ],
            next_page_token=_token(offset + size) if offset + size < len(report.instances) else "",
        )

    async def GetPlan(self, request: billing_pb2.GetPlanRequest, context: Context) -> billing_pb2.GetPlanResponse:
        """The tenant's plan and how much of each limit is used now."""
        tenant = self._auth.tenant(context)
        plan, _source, used, month = plan_usage(self._ledger, tenant, self._now_us())
        return billing_pb2.GetPlanResponse(plan=plan_proto(plan), used=used, period_start_time=ts(month))


def _tenant(value: str) -> str:
    if not value:
        raise invalid_argument("tenant_id is required")
    return value


class PlanServicer(internal_grpc.PlanServiceServicer):
    """cyberdesk.internal.v1.PlanService: admission for instance_svc, plan changes for the webhook path."""

    def __init__(self, ledger: Ledger, internal_token: str, now_us: Callable[[], int] = _now_us) -> None:
        self._ledger = ledger
        self._auth = InternalAuth(internal_token)
        self._now_us = now_us

    async def AdmitCreate(
        self, request: internal_pb2.AdmitCreateRequest, context: Context
    ) -> internal_pb2.AdmitCreateResponse:
        """Decide a create and reserve its share of the plan (one transaction)."""
        self._auth.check(context)
        tenant = _tenant(request.tenant_id)
        if not request.instance_id:
            raise invalid_argument("instance_id is required")
        if min(request.vcpus, request.memory_mib, request.disk_mib) < 0:
            raise invalid_argument("vcpus, memory_mib and disk_mib must not be negative")
        plan, refusal = self._ledger.admit_create(
            tenant,
            request.instance_id,
            request.vcpus,
            request.memory_mib,
            request.disk_mib,
            request.desktop,
            request.timeout.seconds + (1 if request.timeout.nanos else 0),
            self._now_us(),
        )
        if refusal is not None:
            _log.info("create refused", extra={"tenant": tenant, "limit": refusal.limit, "plan": plan.name})
            return internal_pb2.AdmitCreateResponse(admitted=False, refusal=refusal_proto(refusal), plan_name=plan.name)
        return internal_pb2.AdmitCreateResponse(admitted=True, plan_name=plan.name)

    async def ReleaseCreate(
        self, request: internal_pb2.ReleaseCreateRequest, context: Context
    ) -> internal_pb2.ReleaseCreateResponse:
        """Free a create's reservation."""
        self._auth.check(context)
        released = self._ledger.release(_tenant(request.tenant_id), request.instance_id)
        return internal_pb2.ReleaseCreateResponse(released=released)

    async def AdmitTimeout(
        self, request: internal_pb2.AdmitTimeoutRequest, context: Context
    ) -> internal_pb2.AdmitTimeoutResponse:
        """Decide a SetInstanceTimeout."""
        self._auth.check(context)
        tenant = _tenant(request.tenant_id)
        timeout_s = request.timeout.seconds + (1 if request.timeout.nanos else 0)
        plan, refusal = self._ledger.admit_timeout(tenant, timeout_s, self._now_us())
        if refusal is not None:
            return internal_pb2.AdmitTimeoutResponse(
                admitted=False, refusal=refusal_proto(refusal), plan_name=plan.name
            )
        return internal_pb2.AdmitTimeoutResponse(admitted=True, plan_name=plan.name)

    async def SetTenantPlan(
        self, request: internal_pb2.SetTenantPlanRequest, context: Context
    ) -> internal_pb2.SetTenantPlanResponse:
        """Store a tenant's plan unless a newer change is stored already."""
        self._auth.check(context)
        tenant = _tenant(request.tenant_id)
        if not request.HasField("plan"):
            raise invalid_argument("plan is required")
        if request.plan.name in CATALOG and not request.plan.HasField("max_timeout"):
            # A catalog plan by name alone (what an Unkey identity names): that plan's limits.
            plan = CATALOG[request.plan.name]
        else:
            plan = plan_from_proto(request.plan)
        now = self._now_us()
        effective = _us(request.effective_time) if request.HasField("effective_time") else now
        applied, current = self._ledger.set_plan(tenant, plan, effective, request.source or "operator", now)
        _log.info("plan set" if applied else "older plan change ignored", extra={"tenant": tenant, "plan": plan.name})
        return internal_pb2.SetTenantPlanResponse(applied=applied, plan=plan_proto(current))

    async def GetTenantPlan(
        self, request: internal_pb2.GetTenantPlanRequest, context: Context
    ) -> internal_pb2.GetTenantPlanResponse:
        """A tenant's plan and its usage of each limit."""
        self._auth.check(context)
        plan, source, used, month = plan_usage(self._ledger, _tenant(request.tenant_id), self._now_us())
        return internal_pb2.GetTenantPlanResponse(
            plan=plan_proto(plan), used=used, period_start_time=ts(month), source=source
        )
