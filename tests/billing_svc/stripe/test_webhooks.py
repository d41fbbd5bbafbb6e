"""Stripe webhooks into billing_svc's real endpoint: signed deliveries move plans; forged, replayed, stale ones do not.

Deliveries are signed as Stripe signs them (`Stripe-Signature: t=..,v1=HMAC-SHA256(secret,
"t.body")`, computed by the stand-in, not by the library that verifies) and POSTed to the
billing_svc process of the package's stack; the plan is read back through PlanService.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from billing_svc.stripe_standin import sign_webhook, webhook_event
from cyberdesk_common.lifecycle_events import InstanceState
from tests.billing_svc.stripe.conftest import WEBHOOK_SECRET, StripeStack, lifecycle
from tests.support.waiting import wait_until as wait_for


def _subscription(customer: str, status: str, plan: str, tenant: str = "") -> dict[str, Any]:
    return {
        "id": f"sub_{customer}",
        "object": "subscription",
        "customer": customer,
        "status": status,
        "metadata": {"cyberdesk_tenant": tenant} if tenant else {},
        "items": {"object": "list", "data": [{"id": "si_1", "price": {"id": "price_1", "lookup_key": plan}}]},
    }


@pytest.fixture(scope="module")
def hooks(stripe_stack: StripeStack) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        wait_for("the webhook endpoint", lambda: _answers(client, stripe_stack.webhook_url))
        yield client


def _answers(client: httpx.Client, url: str) -> bool:
    try:
        return client.post(url, content=b"{}").status_code == 400
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def mapped(stripe_stack: StripeStack) -> str:
    """The Stripe customer billing_svc made for tenant t-hooks (by reporting its usage)."""
    # An instance that runs now for a second and a half: its windows are later than every window
    # the stack closed before (windows in the past may be closed already, and are never reopened).
    events = lifecycle("t-hooks", "i-hooks", [(time.time(), InstanceState.RUNNING)])
    stripe_stack.publish(events)
    time.sleep(1.5)  # its run time, not a wait for anything
    ended = dataclasses.replace(
        events[0],
        event_id=str(uuid.uuid4()),
        old_state=InstanceState.RUNNING,
        new_state=InstanceState.TERMINATED,
        time_us=time.time_ns() // 1000,
    )
    stripe_stack.publish([ended])
    # The next change on the platform (here a new instance) moves the ledger's watermark past it.
    time.sleep(1.2)
    stripe_stack.publish(lifecycle("t-hooks", "i-hooks-sentinel", [(time.time(), InstanceState.PENDING)]))

    def customer() -> str | None:
        made = stripe_stack.standin.customers.values()
        return next((c["id"] for c in made if c["metadata"].get("cyberdesk_tenant") == "t-hooks"), None)

    return wait_for("t-hooks mapped to a customer", customer)


def _deliver(client: httpx.Client, stack: StripeStack, body: bytes, signature: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    sig = sign_webhook(body, WEBHOOK_SECRET) if signature is None else signature
    if sig:
        headers["Stripe-Signature"] = sig
    return client.post(stack.webhook_url, content=body, headers=headers)


def _plan(stack: StripeStack, tenant: str) -> tuple[str, str]:
    reply = stack.plan_of(tenant)
    return reply.plan.name, reply.source


def test_signed_subscription_update_moves_the_plan(stripe_stack: StripeStack, hooks: httpx.Client, mapped: str) -> None:
    assert _plan(stripe_stack, "t-hooks") == ("local", "default")
    body = webhook_event("customer.subscription.updated", _subscription(mapped, "active", "pro"), event_id="evt_up1")
    answer = _deliver(hooks, stripe_stack, body)
    assert answer.status_code == 200 and answer.json()["outcome"] == "plan:pro", answer.text
    assert _plan(stripe_stack, "t-hooks") == ("pro", "stripe:evt_up1")
    # A failed payment lapses it to the free plan; the paid invoice after it restores the subscription's.
    later = int(time.time()) + 10
    failed = webhook_event("invoice.payment_failed", {"id": "in_1", "customer": mapped}, created=later)
    assert _deliver(hooks, stripe_stack, failed).json()["outcome"] == "plan:free"
    assert _plan(stripe_stack, "t-hooks")[0] == "free"
    paid = webhook_event("invoice.paid", {"id": "in_1", "customer": mapped}, created=later + 5)
    assert _deliver(hooks, stripe_stack, paid).json()["outcome"] == "plan:pro"
    assert _plan(stripe_stack, "t-hooks")[0] == "pro"


def test_bad_signatures_do_not_move_the_plan(stripe_stack: StripeStack, hooks: httpx.Client) -> None:
    tenant = "t-forged"
    body = webhook_event("customer.subscription.created", _subscription("cus_forged", "active", "pro", tenant))
    for signature in (
        sign_webhook(body, "whsec_not_the_secret"),  # another secret
        sign_webhook(body, WEBHOOK_SECRET).replace("v1=", "v1=00"),  # a mangled MAC
        sign_webhook(body, WEBHOOK_SECRET, timestamp=int(time.time()) - 600),  # outside the 300 s tolerance
        "",  # no header
    ):
        answer = _deliver(hooks, stripe_stack, body, signature=signature)
        assert answer.status_code == 400, (signature, answer.text)
    # Signed right, then changed on the way: the MAC is over the raw bytes.
    signature = sign_webhook(body, WEBHOOK_SECRET)
    tampered = body.replace(b'"lookup_key": "pro"', b'"lookup_key": "local"')
    assert tampered != body
    assert _deliver(hooks, stripe_stack, tampered, signature=signature).status_code == 400
    assert _plan(stripe_stack, tenant) == ("local", "default")
    # The same delivery signed right is accepted (so the refusals above were the signatures').
    assert _deliver(hooks, stripe_stack, body).status_code == 200
    assert _plan(stripe_stack, tenant)[0] == "pro"


def test_a_replayed_event_does_not_move_the_plan(stripe_stack: StripeStack, hooks: httpx.Client) -> None:
    tenant = "t-replay"
    now = int(time.time())
    upgrade = webhook_event(
        "customer.subscription.created",
        _subscription("cus_replay", "active", "pro", tenant),
        created=now,
        event_id="evt_replay_up",
    )
    cancel = webhook_event(
        "customer.subscription.deleted",
        _subscription("cus_replay", "canceled", "pro", tenant),
        created=now + 5,
        event_id="evt_replay_cancel",
    )
    assert _deliver(hooks, stripe_stack, upgrade).json()["outcome"] == "plan:pro"
    assert _deliver(hooks, stripe_stack, cancel).json()["outcome"] == "plan:free"
    # The upgrade again (Stripe retrying it, or someone replaying it freshly signed): same event id.
    again = _deliver(hooks, stripe_stack, upgrade)
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate"
    assert _plan(stripe_stack, tenant) == ("free", "stripe:evt_replay_cancel")
    # The event ids are kept in the ledger database: a billing_svc killed and started again still knows it.
    stripe_stack.kill9()
    stripe_stack.start()
    wait_for("the webhook endpoint again", lambda: _answers(hooks, stripe_stack.webhook_url))
    assert _deliver(hooks, stripe_stack, upgrade).json()["outcome"] == "duplicate"
    assert _plan(stripe_stack, tenant) == ("free", "stripe:evt_replay_cancel")


def test_an_out_of_order_delivery_does_not_move_the_plan(stripe_stack: StripeStack, hooks: httpx.Client) -> None:
    tenant = "t-order"
    now = int(time.time())
    newer = webhook_event(
        "customer.subscription.updated",
        _subscription("cus_order", "active", "pro", tenant),
        created=now + 100,
        event_id="evt_order_new",
    )
    older = webhook_event(
        "customer.subscription.updated",
        _subscription("cus_order", "past_due", "pro", tenant),
        created=now + 50,
        event_id="evt_order_old",
    )
    assert _deliver(hooks, stripe_stack, newer).json()["outcome"] == "plan:pro"
    late = _deliver(hooks, stripe_stack, older)
    assert late.status_code == 200 and late.json()["outcome"] == "stale"
    assert _plan(stripe_stack, tenant) == ("pro", "stripe:evt_order_new")


def test_events_for_no_known_tenant_or_plan_are_acknowledged_and_change_nothing(
    stripe_stack: StripeStack, hooks: httpx.Client
) -> None:
    unknown = webhook_event("customer.subscription.updated", _subscription("cus_nobody", "active", "pro"))
    assert _deliver(hooks, stripe_stack, unknown).json()["outcome"] == "unknown_customer"
    odd_plan = webhook_event(
        "customer.subscription.updated", _subscription("cus_odd", "active", "enterprise-xl", "t-odd")
    )
    assert _deliver(hooks, stripe_stack, odd_plan).json()["outcome"] == "unknown_plan"
    assert _plan(stripe_stack, "t-odd") == ("local", "default")
    other = webhook_event("charge.succeeded", {"id": "ch_1", "customer": "cus_odd"})
    assert _deliver(hooks, stripe_stack, other).json()["outcome"] == "ignored"
    assert hooks.get(stripe_stack.webhook_url).status_code == 405
    assert hooks.post(stripe_stack.webhook_url.replace("/webhook", "/other"), content=b"").status_code == 404
