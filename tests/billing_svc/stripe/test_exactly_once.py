"""kill -9 of billing_svc at several points of a flush to Stripe, and Stripe faults: no loss, no double.

billing_svc meters instances with known times from the event stream, closes 1 s windows into its
outbox and reports them to the stand-in over the v2 stream. It is killed (SIGKILL) while:

1. a customer create was done at Stripe but its answer not yet received;
2. a meter event session was made at Stripe but its answer not yet received;
3. a stream batch reached Stripe and was not processed (the connection then drops);
4. a stream batch was processed by Stripe but its answer not yet received;
5. batches are being answered, with random 500s, 429s and dropped connections, right after
   some were acknowledged.

After each kill it is started again on the same ledger. In the end: the stand-in holds each
identifier of the ledger's windows once, no identifier with two payloads, one customer per
tenant, and per (tenant, meter) the sum of values at Stripe equals the ledger's usage (GetUsage
over gRPC) and the usage computed here from the event times with the rounding rule.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections import defaultdict

import grpc

from billing_svc.stripe_standin import Fault, Hold
from cyberdesk_common.lifecycle_events import InstanceState, LifecycleEvent
from cyberdesk_common.metadata import INTERNAL_TOKEN_METADATA, TENANT_METADATA
from cyberdesk_proto.v1 import billing_pb2, billing_pb2_grpc
from tests.billing_svc.stripe.conftest import StripeStack, lifecycle
from tests.support.waiting import wait_until as wait_for

R, P = InstanceState.RUNNING, InstanceState.PAUSED
METERS = ("instance_seconds", "vcpu_seconds", "memory_mib_seconds", "desktop_seconds", "disk_mib_seconds")
TENANTS = ("t-alpha", "t-beta", "t-gamma", "t-delta")


def _instances(now: float) -> tuple[list[LifecycleEvent], float]:
    events: list[LifecycleEvent] = []
    last = 0.0
    for k in range(16):
        t0 = now - 280 + k * 5 + 0.37
        moves = [
            (t0, InstanceState.PENDING),
            (t0 + 0.31, InstanceState.STARTING),
            (t0 + 1.2, R),
            (t0 + 60.55, P),
            (t0 + 75.9, R),
            (t0 + 140.25, InstanceState.STOPPING),
            (t0 + 140.8, InstanceState.TERMINATED),
        ]
        last = max(last, moves[-1][0])
        events += lifecycle(
            TENANTS[k % 4],
            f"i-once-{k:02d}",
            moves,
            vcpus=1 + k % 3,
            memory_mib=512 * (1 + k % 2),
            disk_mib=1024 + 256 * (k % 3),
            desktop=k % 4 == 0,
        )
    return events, last


def _expected(events: list[LifecycleEvent]) -> dict[tuple[str, str], int]:
    """Usage per (tenant, meter) from the event times: an interval a..b is floor(b) - floor(a) seconds."""
    by_instance: dict[str, list[LifecycleEvent]] = defaultdict(list)
    for e in events:
        by_instance[e.instance_id].append(e)
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for moves in by_instance.values():
        moves.sort(key=lambda e: e.time_us)
        for a, b in itertools.pairwise(moves):
            secs = b.time_us // 1_000_000 - a.time_us // 1_000_000
            if a.new_state == R:
                totals[(a.tenant, "instance_seconds")] += secs
                totals[(a.tenant, "vcpu_seconds")] += secs * a.vcpus
                totals[(a.tenant, "memory_mib_seconds")] += secs * a.memory_mib
                if a.desktop:
                    totals[(a.tenant, "desktop_seconds")] += secs
            if a.new_state in (R, P):
                totals[(a.tenant, "disk_mib_seconds")] += secs * a.disk_mib
    return dict(totals)


def _held(stack: StripeStack, route: str, stage: str, then: str = "answer") -> Hold:
    hold = Hold(stage=stage, then=then)
    stack.standin.inject(route, Fault("hold", hold=hold))
    return hold


def _kill_at(stack: StripeStack, hold: Hold, what: str) -> None:
    assert hold.arrived.wait(60), f"billing_svc never reached: {what}\n{stack.log()[-3000:]}"
    stack.kill9()
    hold.release()  # the held request goes on towards a dead client
    stack.start()


def test_kill9_mid_flush_and_stripe_faults_neither_lose_nor_double(stripe_stack: StripeStack) -> None:
    stack = stripe_stack
    now = time.time()
    events, last = _instances(now)
    # The stream's newest event moves the ledger's watermark past the last window (instance_svc
    # stamps events with their commit time, so on a live platform this is any later change).
    events += lifecycle("t-alpha", "i-once-sentinel", [(now - 0.5, InstanceState.PENDING)])

    # 1. The first customer is made at Stripe; its answer is held; billing_svc dies.
    customer = _held(stack, "customers", "processed")
    stack.publish(events)
    # Queued now for after the restarts (each is the next request of its route).
    session = _held(stack, "v2_session", "processed")
    _kill_at(stack, customer, "a customer create")
    # 2. A session is made at Stripe; its token never reaches billing_svc.
    before = _held(stack, "v2_stream", "before", then="drop")
    _kill_at(stack, session, "a meter event session")
    # 3. A batch reaches Stripe and is dropped unprocessed.
    processed = _held(stack, "v2_stream", "processed")
    _kill_at(stack, before, "a stream batch")
    # Slow answers from here on (queued behind the hold), so that step 5 finds batches still to send.
    stack.standin.inject("v2_stream", *[Fault("delay", seconds=0.15) for _ in range(40)])
    # 4. A batch is processed at Stripe; the answer is held.
    _kill_at(stack, processed, "a processed stream batch")
    # 5. Random faults, and a kill right after a few batches were answered.
    stack.standin.fail_randomly(
        "v2_stream", 0.25, ["status_500", "status_429", "drop_before", "drop_after"], seed=len(events)
    )

    def stream_oks() -> int:
        return sum(1 for _, p, s in stack.standin.requests if p == "/v2/billing/meter_event_stream" and s == 200)

    seen = stream_oks()
    wait_for("three more stream batches accepted", lambda: stream_oks() >= seen + 3)
    stack.kill9()
    stack.start()
    try:
        last_window_end = int(last) + 1

        def drained() -> bool:
            with sqlite3.connect(f"file:{stack.db}?mode=ro", uri=True, timeout=30) as db:
                closed = db.execute("SELECT MAX(window_end) FROM stripe_windows").fetchone()[0] or 0
                pending = db.execute("SELECT COUNT(*) FROM stripe_outbox WHERE state = 'pending'").fetchone()[0]
            return closed >= last_window_end and pending == 0

        wait_for("the outbox drained past the last window", drained, timeout=90)
    finally:
        stack.standin.fail_randomly("v2_stream", 0, [])

    with sqlite3.connect(f"file:{stack.db}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT identifier, tenant, event_name, value, state FROM stripe_outbox").fetchall()
        customers = dict(db.execute("SELECT tenant, customer_id FROM stripe_customers"))
    assert {state for *_, state in rows} <= {"delivered", "duplicate"}, rows[:5]
    accepted = stack.standin.accepted()
    ours = [r for r in rows if r[0].startswith("cd1:i-once-")]
    assert sorted(i for i, *_ in ours) == sorted(i for i in accepted if i.startswith("cd1:i-once-"))
    for identifier, tenant, event_name, value, _ in ours:
        got = accepted[identifier]
        assert (got.customer, got.event_name, got.value) == (customers[tenant], event_name, value), identifier
    assert stack.standin.conflicts == []
    # One customer per tenant at Stripe, though the first create's answer was lost to a kill.
    assert sorted(customers) == sorted(TENANTS)
    assert len({c["metadata"]["cyberdesk_tenant"] for c in stack.standin.customers.values()}) == len(
        stack.standin.customers
    )
    # The kills and faults made Stripe see some identifiers more than once; it kept each once.
    assert any(n > 1 for n in stack.standin.submissions.values())

    expected = _expected([e for e in events if e.instance_id.startswith("i-once-")])
    stub = billing_pb2_grpc.BillingServiceStub(grpc.insecure_channel(stack.billing_addr))
    for tenant in TENANTS:
        at_stripe = {meter: stack.standin.total(f"cyberdesk_{meter}", customers[tenant]) for meter in METERS}
        request = billing_pb2.GetUsageRequest()
        request.start_time.FromSeconds(int(now) - 3600)
        usage = stub.GetUsage(
            request, metadata=((INTERNAL_TOKEN_METADATA, stack.token), (TENANT_METADATA, tenant)), timeout=10
        ).total
        ledger = {
            "instance_seconds": usage.instance_seconds,
            "vcpu_seconds": usage.vcpu_seconds,
            "memory_mib_seconds": usage.memory_mib_seconds,
            "desktop_seconds": usage.desktop_seconds,
            "disk_mib_seconds": usage.disk_mib_seconds,
        }
        assert at_stripe == ledger, tenant
        assert ledger == {m: expected.get((tenant, m), 0) for m in ledger}, tenant
    assert stack.starts == 6
