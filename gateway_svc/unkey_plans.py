"""The plan an Unkey identity names, carried to billing_svc (used by the Unkey key backend only).

Where keys are verified through Unkey, the tenant's plan can live with the tenant's identity
there: `identity.meta.plan` (or the key's own `meta.plan`) names a plan of billing's catalog
("free", "pro", ...). Each verification that Unkey answers (the gateway's auth cache spares most
calls) reads it, and when it differs from what this gateway last stored for the tenant, the
gateway stores it with `PlanService.SetTenantPlan` (the plan by name, source
`unkey:<identity id>`, effective now) before the call goes on, so the call it admits is already
decided against that plan. A failure to reach billing is logged and retried on the next
verification; it never fails the caller's request. An unknown plan name is refused by billing
(INVALID_ARGUMENT), logged once per name.

Unkey's `credits` stay what they are in `unkey_backend.py`: a per-key request allowance that
Unkey spends and enforces at verification (USAGE_EXCEEDED). The local key store has no plan
claim and is untouched: its tenants keep the plan billing_svc holds (default or set otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from cyberdesk_common.metadata import INTERNAL_TOKEN_METADATA
from cyberdesk_proto.internal.v1 import billing_pb2 as internal_pb2
from cyberdesk_proto.internal.v1 import billing_pb2_grpc as internal_grpc
from cyberdesk_proto.v1 import billing_pb2

_log = logging.getLogger("gateway_svc.unkey")


def plan_claim(data: Any) -> tuple[str, str]:
    """(plan name, identity id) an Unkey verify answer names; ("", "") when none."""
    identity = getattr(data, "identity", None)
    identity_meta: dict[str, Any] = (getattr(identity, "meta", None) or {}) if identity is not None else {}
    key_meta: dict[str, Any] = getattr(data, "meta", None) or {}
    plan = identity_meta.get("plan") or key_meta.get("plan") or ""
    if not isinstance(plan, str):
        return "", ""
    source = (getattr(identity, "id", "") if identity is not None else "") or getattr(data, "key_id", "") or "key"
    return plan, str(source)


class PlanSync:
    """Stores a tenant's Unkey plan in billing_svc when it changes (per gateway process)."""

    def __init__(
        self, channel: Callable[[], grpc.aio.Channel | None], internal_token: str, timeout: float = 2.0
    ) -> None:
        self._channel = channel
        self._token = internal_token
        self._timeout = timeout
        self._stored: dict[str, str] = {}  # tenant -> the plan name billing holds from us

    async def observe(self, tenant: str, plan: str, source: str) -> None:
        """Called for each Unkey verification of a valid key of `tenant` whose identity names `plan`."""
        if not plan or self._stored.get(tenant) == plan:
            return
        channel = self._channel()
        if channel is None:
            return
        stub = internal_grpc.PlanServiceStub(channel)
        try:
            await stub.SetTenantPlan(
                internal_pb2.SetTenantPlanRequest(
                    tenant_id=tenant, plan=billing_pb2.Plan(name=plan), source=f"unkey:{source}"
                ),
                metadata=((INTERNAL_TOKEN_METADATA, self._token),),
                timeout=self._timeout,
            )
        except grpc.RpcError as err:
            code = err.code()
            _log.warning(
                "the Unkey identity's plan could not be stored in billing",
                extra={"tenant": tenant, "plan": plan, "status": code.name if code else ""},
            )
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                self._stored[tenant] = plan  # asking again cannot help until the identity changes
            return
        self._stored[tenant] = plan
        _log.info("plan from the Unkey identity stored", extra={"tenant": tenant, "plan": plan})
