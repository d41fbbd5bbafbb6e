"""One billing_svc process reporting to the Stripe stand-in, shared by the process-level Stripe tests.

Real parts: a redis-server of its own (billing_svc's consumer group must not share a stream with
another test's billing_svc), billing_svc as `python -m billing_svc` on its own ledger file, the
real `stripe` library inside it. Stripe's hosted API is the stand-in (billing_svc/stripe_standin.py)
on loopback, in this process so a test can hold a request at a chosen stage and kill billing_svc
there. Lifecycle events are written to the stream as instance_svc's publisher writes them
(`LifecycleEvent.fields()`, XADD, in commit order), for instances whose times the test chooses.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import redis

from billing_svc.stripe_standin import StripeStandin
from cyberdesk_common.lifecycle_events import STREAM, InstanceState, LifecycleEvent
from cyberdesk_common.metadata import INTERNAL_TOKEN_METADATA
from cyberdesk_proto.internal.v1 import billing_pb2 as internal_pb2
from cyberdesk_proto.internal.v1 import billing_pb2_grpc as internal_grpc
from cyberdesk_stack.processes import free_port, redis_server, spawn, stop, wait_healthy

T = TypeVar("T")
KEY = "sk_test_" + secrets.token_hex(8)
WEBHOOK_SECRET = "whsec_" + secrets.token_hex(16)
WINDOW_S = 1


@dataclass
class StripeStack:
    """billing_svc (restartable, killable), its Redis and ledger, and the Stripe stand-in."""

    tmp: Path
    redis_url: str
    standin: StripeStandin
    billing_addr: str
    webhook_url: str
    token: str
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    published: list[LifecycleEvent] = field(default_factory=list)

    @property
    def db(self) -> Path:
        return self.tmp / "ledger.db"

    def env(self) -> dict[str, str]:
        return {
            "CYBERDESK_STATE_DIR": str(self.tmp / "state"),
            "CYBERDESK_BILLING_DB": str(self.db),
            "CYBERDESK_BILLING_ADDR": self.billing_addr,
            "CYBERDESK_INTERNAL_TOKEN": self.token,
            "REDIS_URL": self.redis_url,
            "CYBERDESK_BILLING_CONSUMER": "billing-stripe-test",
            "CYBERDESK_STRIPE_SECRET_KEY": KEY,
            "CYBERDESK_STRIPE_API_BASE": self.standin.url,
            "CYBERDESK_STRIPE_BACKOFF_CAP_SECONDS": "0.5",
            "CYBERDESK_STRIPE_POLL_SECONDS": "0.05",
            # One batch at a time: the faults queued at the stand-in meet the requests in order,
            # so each kill point of test_exactly_once is hit by the process it was meant for.
            "CYBERDESK_STRIPE_CONCURRENCY": "1",
            "CYBERDESK_BILLING_WINDOW_SECONDS": str(WINDOW_S),
            "CYBERDESK_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "CYBERDESK_BILLING_WEBHOOK_ADDR": self.webhook_url.removeprefix("http://").split("/", 1)[0],
        }

    def start(self) -> None:
        """Start billing_svc and wait until it serves (gRPC health) and its webhook port answers."""
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        self.proc = spawn([sys.executable, "-m", "billing_svc"], self.env(), self.tmp / "billing_svc.log")
        wait_healthy(self.billing_addr, timeout=60, proc=self.proc)

    def kill9(self) -> None:
        """SIGKILL billing_svc (no drain, no cleanup) and reap it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def log(self) -> str:
        return (self.tmp / "billing_svc.log").read_text(errors="replace")

    def publish(self, events: list[LifecycleEvent]) -> None:
        """XADD `events` to the stream in time order, as instance_svc's publisher does (commit order)."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            pipe = client.pipeline()
            for event in sorted(events, key=lambda e: e.time_us):
                pipe.xadd(STREAM, event.fields())  # type: ignore[arg-type]
            pipe.execute()
        finally:
            client.close()
        self.published.extend(events)

    def plans(self) -> internal_grpc.PlanServiceStub:
        return internal_grpc.PlanServiceStub(grpc.insecure_channel(self.billing_addr))

    def plan_of(self, tenant: str) -> internal_pb2.GetTenantPlanResponse:
        reply: internal_pb2.GetTenantPlanResponse = self.plans().GetTenantPlan(
            internal_pb2.GetTenantPlanRequest(tenant_id=tenant),
            metadata=((INTERNAL_TOKEN_METADATA, self.token),),
            timeout=10,
        )
        return reply


def lifecycle(
    tenant: str,
    instance_id: str,
    moves: list[tuple[float, InstanceState]],
    *,
    vcpus: int = 2,
    memory_mib: int = 1024,
    disk_mib: int = 2048,
    desktop: bool = False,
) -> list[LifecycleEvent]:
    """The events of one instance moving through `moves` ((unix time, state), in order)."""
    events = []
    old: InstanceState | None = None
    for when, state in moves:
        events.append(
            LifecycleEvent(
                event_id=str(uuid.uuid4()),
                tenant=tenant,
                instance_id=instance_id,
                old_state=old,
                new_state=state,
                time_us=int(when * 1_000_000),
                vcpus=vcpus,
                memory_mib=memory_mib,
                template="desktop" if desktop else "base",
                state_message="",
                disk_mib=disk_mib,
                desktop=desktop,
            )
        )
        old = state
    return events


@pytest.fixture(scope="package")
def stripe_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StripeStack]:
    tmp = tmp_path_factory.mktemp("stripe-stack")
    standin = StripeStandin(KEY).start()
    try:
        with redis_server(tmp_path_factory.mktemp("stripe-redis")) as url:
            stack = StripeStack(
                tmp=tmp,
                redis_url=url,
                standin=standin,
                billing_addr=f"127.0.0.1:{free_port()}",
                webhook_url=f"http://127.0.0.1:{free_port()}/v1/billing/stripe/webhook",
                token=secrets.token_hex(16),
            )
            stack.start()
            try:
                yield stack
            finally:
                if stack.proc is not None:
                    stop(stack.proc)
    finally:
        standin.stop()
