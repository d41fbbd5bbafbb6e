"""The credit policy: what happens to running instances once a tenant's monthly allowance is used up.

Every `interval` seconds, for each tenant with RUNNING instances and a limited plan: when its
RUNNING seconds this month reach the allowance, the time is recorded (once per month, in the
ledger, so a restart keeps the grace period's start); once the plan's grace has passed, the
plan's policy acts on each RUNNING instance through instance_svc's own InstanceService (as the
gateway calls it: the tenant and the internal token), so the instance's state, events and
metering follow the ordinary path. PAUSE falls back to a delete where the runtime cannot pause.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from billing_svc.ledger import Ledger
from billing_svc.plans import CreditPolicy
from cyberdesk_common.channel_options import CHANNEL_OPTIONS
from cyberdesk_common.metadata import internal_metadata
from cyberdesk_proto.v1 import instance_pb2, instance_pb2_grpc

_log = logging.getLogger("billing_svc.enforcer")


def _now_us() -> int:
    return time.time_ns() // 1000


class Enforcer:
    """Applies each tenant's credit policy to its running instances."""

    def __init__(
        self,
        ledger: Ledger,
        instance_target: str,
        internal_token: str,
        interval: float = 5.0,
        now_us: Callable[[], int] = _now_us,
    ) -> None:
        self._ledger = ledger
        self._target = instance_target
        self._token = internal_token
        self.interval = interval
        self._now_us = now_us
        self._channel: grpc.aio.Channel | None = None
        self.acted: list[tuple[str, str, str]] = []  # (tenant, instance, action), for the log and tests

    async def run(self) -> None:
        """Check every `interval` seconds until cancelled."""
        self._channel = grpc.aio.insecure_channel(self._target, options=list(CHANNEL_OPTIONS))
        try:
            while True:
                try:
                    await self.check()
                except Exception as err:  # one bad round must not end enforcement
                    _log.warning("credit check failed", extra={"error": str(err)})
                await asyncio.sleep(self.interval)
        finally:
            await self._channel.close(grace=None)

    async def check(self) -> None:
        """One round over the tenants with running instances."""
        now = self._now_us()
        for tenant in self._ledger.tenants_running():
            plan, _ = self._ledger.plan(tenant)
            if not plan.monthly_instance_seconds:
                continue
            held = self._ledger.held(tenant, now)
            exhausted = held.monthly_instance_seconds >= plan.monthly_instance_seconds
            since = self._ledger.exhausted_since(tenant, now, exhausted)
            if not since or plan.credit_policy is CreditPolicy.REFUSE_NEW:
                continue
            if now - since < plan.credit_grace_s * 1_000_000:
                continue
            for instance_id in self._ledger.running_instances(tenant):
                await self._act(tenant, instance_id, plan.credit_policy)
            self._ledger.mark_enforced(tenant, now)

    async def _act(self, tenant: str, instance_id: str, policy: CreditPolicy) -> None:
        assert self._channel is not None
        stub = instance_pb2_grpc.InstanceServiceStub(self._channel)
        metadata = internal_metadata(tenant, self._token)
        action = "pause" if policy is CreditPolicy.PAUSE else "delete"
        try:
            if action == "pause":
                try:
                    await stub.PauseInstance(
                        instance_pb2.PauseInstanceRequest(instance_id=instance_id), metadata=metadata, timeout=10
                    )
                except grpc.aio.AioRpcError as err:
                    if err.code() is not grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    # Paused or ending already (the ledger lags a little), or a runtime that
                    # cannot pause: only a still RUNNING instance is then deleted.
                    got = await stub.GetInstance(
                        instance_pb2.GetInstanceRequest(instance_id=instance_id), metadata=metadata, timeout=10
                    )
                    if got.instance.state != instance_pb2.INSTANCE_STATE_RUNNING:
                        return
                    action = "delete"
            if action == "delete":
                await stub.DeleteInstance(
                    instance_pb2.DeleteInstanceRequest(instance_id=instance_id), metadata=metadata, timeout=30
                )
        except grpc.aio.AioRpcError as err:
            _log.warning(
                "credit policy could not act",
                extra={"tenant": tenant, "instance_id": instance_id, "code": err.code().name},
            )
            return
        self.acted.append((tenant, instance_id, action))
        _log.info(
            "monthly allowance used up: instance acted on",
            extra={"tenant": tenant, "instance_id": instance_id, "action": action},
        )
