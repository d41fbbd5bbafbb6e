"""Wiring of billing_svc: the ledger, the meter (consumer group), the credit enforcer, the gRPC servicers.

Settings (CYBERDESK_<NAME>; docs/billing.md):
- BILLING_ADDR (127.0.0.1:50071): where it listens.
- BILLING_DB (<state>/billing/ledger.db): the SQLite ledger.
- BILLING_CONSUMER (billing-<hostname>): its name in the consumer group `billing`.
- BILLING_DEFAULT_PLAN (local): the plan of tenants without one.
- BILLING_ENFORCE_SECONDS (5): how often the credit policy is checked.
- INSTANCE_ADDR (127.0.0.1:50061): instance_svc, which the credit policy pauses instances through.
- REDIS_URL / CYBERDESK_REDIS_URL: the event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from billing_svc import stripe_service
from billing_svc.enforcer import Enforcer
from billing_svc.ledger import Ledger
from billing_svc.meter import Meter
from billing_svc.plans import default_plan
from billing_svc.servicer import BillingServicer, PlanServicer
from cyberdesk_common.config import env_float, env_str, internal_token, platform_redis_url, state_dir
from cyberdesk_common.grpc_server import RunningServer, ServerSpec
from cyberdesk_proto.internal.v1 import billing_pb2 as internal_pb2
from cyberdesk_proto.internal.v1 import billing_pb2_grpc as internal_grpc
from cyberdesk_proto.v1 import billing_pb2, billing_pb2_grpc

_log = logging.getLogger("billing_svc")


def ledger_path(base: Path) -> Path:
    """Where the ledger lives: CYBERDESK_BILLING_DB, else <state>/billing/ledger.db."""
    return Path(env_str("BILLING_DB", str(base / "billing" / "ledger.db")))


@dataclass
class App:
    """Everything billing_svc runs; background work starts once the server serves."""

    spec: ServerSpec
    ledger: Ledger
    meter: Meter
    enforcer: Enforcer
    # More background work started beside the meter (the Stripe outbox adds itself here).
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def on_started(self, running: RunningServer) -> None:
        """Start metering, enforcement and any other background work."""
        for name, factory in (
            ("meter", self.meter.run),
            ("enforcer", self.enforcer.run),
            *((f"background-{i}", f) for i, f in enumerate(self.background)),
        ):
            self._tasks.append(asyncio.create_task(factory(), name=name))
        _log.info("billing ready", extra={"ledger": str(self.ledger.path), "consumer": self.meter.consumer})

    async def on_stopping(self) -> None:
        """Stop background work (a batch being applied commits or rolls back whole), close the ledger."""
        # The meter is asked to stop and returns after its current read (see meter.py), the rest is cancelled.
        self.meter.request_stop()
        meter, others = self._tasks[:1], self._tasks[1:]
        for task in others:
            task.cancel()
        if meter:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(meter[0]), self.meter.block_ms / 1000 + 2)
            meter[0].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.ledger.close()


def build_app() -> App:
    """Build billing_svc from the environment."""
    base = state_dir()
    token = internal_token(base)
    ledger = Ledger(ledger_path(base), default_plan())
    meter = Meter(ledger, platform_redis_url(base), env_str("BILLING_CONSUMER", "") or None)
    enforcer = Enforcer(
        ledger,
        env_str("INSTANCE_ADDR", "127.0.0.1:50061"),
        token,
        interval=env_float("BILLING_ENFORCE_SECONDS", 5.0),
    )

    def register(server: grpc.aio.Server) -> Sequence[str]:
        billing_pb2_grpc.add_BillingServiceServicer_to_server(BillingServicer(ledger, token), server)
        internal_grpc.add_PlanServiceServicer_to_server(PlanServicer(ledger, token), server)
        return [
            billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name,
            internal_pb2.DESCRIPTOR.services_by_name["PlanService"].full_name,
        ]

    spec = ServerSpec(name="billing_svc", addresses=[env_str("BILLING_ADDR", "127.0.0.1:50071")], register=register)
    # Stripe (docs/billing.md, "Stripe"): nothing runs, and nothing leaves the machine, without a key.
    return App(spec, ledger, meter, enforcer, background=stripe_service.background(ledger))


def build_spec() -> ServerSpec:
    """The server of billing_svc, listening on CYBERDESK_BILLING_ADDR (default 127.0.0.1:50071)."""
    return build_app().spec
