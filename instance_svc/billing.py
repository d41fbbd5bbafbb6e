"""Asking billing_svc before every create and SetInstanceTimeout (one PlanService RPC each).

`INSTANCE_SVC_BILLING` says what happens when billing_svc cannot answer (docs/billing.md):
`closed` refuses the call with UNAVAILABLE, `open` lets it through (logged), `off` never asks.
A refusal by the plan is RESOURCE_EXHAUSTED or FAILED_PRECONDITION with billing_svc's message
(the limit, its value, the usage), whatever the setting.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import grpc
from google.protobuf import duration_pb2

from cyberdesk_common.channel_options import CHANNEL_OPTIONS
from cyberdesk_common.config import ConfigError
from cyberdesk_common.metadata import INTERNAL_TOKEN_METADATA
from cyberdesk_common.status import RpcError
from cyberdesk_proto.internal.v1 import billing_pb2, billing_pb2_grpc

_log = logging.getLogger("instance_svc.billing")

MODE_ENV = "INSTANCE_SVC_BILLING"
MODES = ("closed", "open", "off")
# An admission is one SQLite transaction in billing_svc: milliseconds. Longer means it is in trouble.
_TIMEOUT_S = 2.0
UNAVAILABLE = "billing is unavailable; retry shortly"


def billing_mode() -> str:
    """INSTANCE_SVC_BILLING: "closed", "open" or "off" (the default when unset)."""
    value = os.environ.get(MODE_ENV, "").strip() or "off"
    if value not in MODES:
        raise ConfigError(f"{MODE_ENV}={value!r}: use closed, open or off")
    return value


class PlanGate(Protocol):
    """What the lifecycle asks of billing (the unit tests pass `NO_BILLING`)."""

    async def admit_create(
        self, tenant: str, instance_id: str, vcpus: int, memory_mib: int, disk_mib: int, desktop: bool, timeout_us: int
    ) -> None:
        """Return when the plan admits the create (its share is then reserved); raise the refusal otherwise."""
        ...

    async def release(self, tenant: str, instance_id: str) -> None:
        """Free the reservation of a create that did not happen (best effort)."""
        ...

    async def admit_timeout(self, tenant: str, instance_id: str, timeout_us: int) -> None:
        """Return when the plan admits the new timeout; raise the refusal otherwise."""
        ...


class _NoBilling:
    async def admit_create(
        self, tenant: str, instance_id: str, vcpus: int, memory_mib: int, disk_mib: int, desktop: bool, timeout_us: int
    ) -> None:
        return None

    async def release(self, tenant: str, instance_id: str) -> None:
        return None

    async def admit_timeout(self, tenant: str, instance_id: str, timeout_us: int) -> None:
        return None


NO_BILLING: PlanGate = _NoBilling()


def _duration(us: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def _refused(refusal: billing_pb2.Refusal) -> RpcError:
    code = {c.value[0]: c for c in grpc.StatusCode}.get(refusal.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
    if code not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    return RpcError(code, refusal.message or f"the plan's {refusal.limit} limit ({refusal.value}) is reached")


class BillingClient:
    """PlanGate over billing_svc's PlanService, with the fail-open or fail-closed mode."""

    def __init__(self, target: str, internal_token: str, mode: str) -> None:
        if mode not in ("closed", "open"):
            raise ValueError(mode)
        self.mode = mode
        self._target = target
        self._channel: grpc.aio.Channel | None = None
        self._metadata = ((INTERNAL_TOKEN_METADATA, internal_token),)

    @property
    def _stub(self) -> billing_pb2_grpc.PlanServiceAsyncStub:
        # Made on first use, inside the event loop (the client is built before the loop starts).
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self._target, options=list(CHANNEL_OPTIONS))
        return billing_pb2_grpc.PlanServiceStub(self._channel)

    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            await self._channel.close(grace=None)

    def _unanswered(self, what: str, err: grpc.aio.AioRpcError) -> None:
        if self.mode == "closed":
            _log.warning("billing did not answer; refusing", extra={"call": what, "code": err.code().name})
            raise RpcError(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE) from None
        _log.warning("billing did not answer; letting the call through", extra={"call": what, "code": err.code().name})

    async def admit_create(
        self, tenant: str, instance_id: str, vcpus: int, memory_mib: int, disk_mib: int, desktop: bool, timeout_us: int
    ) -> None:
        """Ask AdmitCreate; raise its refusal, or apply the mode when billing_svc does not answer."""
        request = billing_pb2.AdmitCreateRequest(
            tenant_id=tenant,
            instance_id=instance_id,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_mib=disk_mib,
            desktop=desktop,
            timeout=_duration(timeout_us),
        )
        try:
            reply = await self._stub.AdmitCreate(request, metadata=self._metadata, timeout=_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            self._unanswered("AdmitCreate", err)
            return
        if not reply.admitted:
            raise _refused(reply.refusal)

    async def release(self, tenant: str, instance_id: str) -> None:
        """ReleaseCreate, best effort: an unreleased reservation lapses after 120 s anyway."""
        try:
            await self._stub.ReleaseCreate(
                billing_pb2.ReleaseCreateRequest(tenant_id=tenant, instance_id=instance_id),
                metadata=self._metadata,
                timeout=_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as err:
            _log.info("could not release a reservation", extra={"instance_id": instance_id, "code": err.code().name})

    async def admit_timeout(self, tenant: str, instance_id: str, timeout_us: int) -> None:
        """Ask AdmitTimeout; raise its refusal, or apply the mode when billing_svc does not answer."""
        request = billing_pb2.AdmitTimeoutRequest(
            tenant_id=tenant, instance_id=instance_id, timeout=_duration(timeout_us)
        )
        try:
            reply = await self._stub.AdmitTimeout(request, metadata=self._metadata, timeout=_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            self._unanswered("AdmitTimeout", err)
            return
        if not reply.admitted:
            raise _refused(reply.refusal)
