"""The pure rules of the Stripe path: which plan an event names, when a window may close, when a row ages out."""

from __future__ import annotations

import random

import pytest
import stripe

from billing_svc import outbox, plans
from billing_svc.outbox import OutboxRow
from billing_svc.stripe_delivery import backoff, classify, rfc3339
from billing_svc.stripe_windows import closable_until
from billing_svc.webhooks import Subscription, decide, plan_of_subscription

NOW = 1_800_000_000


def _sub(status: str = "active", **extra: object) -> dict[str, object]:
    return {"id": "sub_1", "customer": "cus_1", "status": status, **extra}


def test_the_plan_of_a_subscription_by_precedence() -> None:
    price = {"lookup_key": "pro", "metadata": {"cyberdesk_plan": "free"}}
    items = {"data": [{"price": price}]}
    assert plan_of_subscription(_sub(items=items, metadata={"cyberdesk_plan": "local"})) == "local"
    assert plan_of_subscription(_sub(items=items)) == "pro"
    assert plan_of_subscription(_sub(items={"data": [{"price": {"metadata": {"cyberdesk_plan": "free"}}}]})) == "free"
    assert plan_of_subscription(_sub()) == ""


@pytest.mark.parametrize(
    ("event_type", "status", "expected"),
    [
        ("customer.subscription.created", "active", ("plan", "pro")),
        ("customer.subscription.updated", "trialing", ("plan", "pro")),
        ("customer.subscription.updated", "past_due", ("plan", "free")),
        ("customer.subscription.updated", "unpaid", ("plan", "free")),
        ("customer.subscription.updated", "incomplete", ("plan", "free")),
        ("customer.subscription.deleted", "active", ("plan", "free")),  # deleted is deleted, whatever it says
        ("charge.succeeded", "active", ("ignored", "")),
    ],
)
def test_subscription_events(event_type: str, status: str, expected: tuple[str, str]) -> None:
    obj = _sub(status, metadata={"cyberdesk_plan": "pro"})
    decision = decide(event_type, obj, NOW, None, "free", plans.CATALOG)
    assert (decision.outcome, decision.plan) == expected


def test_an_unknown_plan_name_is_not_applied() -> None:
    obj = _sub(metadata={"cyberdesk_plan": "platinum"})
    assert decide("customer.subscription.updated", obj, NOW, None, "free", plans.CATALOG).outcome == "unknown_plan"


def test_invoices_lapse_and_restore_the_subscription_plan() -> None:
    latest = Subscription("sub_1", "pro", "past_due", NOW - 10)
    failed = decide("invoice.payment_failed", {"customer": "cus_1"}, NOW, latest, "free", plans.CATALOG)
    assert (failed.outcome, failed.plan) == ("plan", "free")
    paid = decide("invoice.paid", {"customer": "cus_1"}, NOW, latest, "free", plans.CATALOG)
    assert (paid.outcome, paid.plan) == ("plan", "pro")
    ended = Subscription("sub_1", "pro", "canceled", NOW - 10)
    assert decide("invoice.paid", {}, NOW, ended, "free", plans.CATALOG).outcome == "ignored"
    assert decide("invoice.paid", {}, NOW, None, "free", plans.CATALOG).outcome == "ignored"


def test_a_window_closes_once_the_watermark_is_a_second_past_it_or_the_platform_was_quiet() -> None:
    assert closable_until(watermark_us=(NOW + 5) * 1_000_000 + 300_000, now_s=NOW + 6, idle_close_s=300) == NOW + 4
    assert closable_until(watermark_us=0, now_s=NOW, idle_close_s=300) == NOW - 300
    assert closable_until(watermark_us=(NOW - 900) * 1_000_000, now_s=NOW, idle_close_s=300) == NOW - 300


def test_rows_age_out_only_when_sending_is_unsafe_or_useless() -> None:
    def row(timestamp: int, uncertain_since: int | None) -> OutboxRow:
        return OutboxRow("cd1:i:m:1", "t", "cyberdesk_m", 1, timestamp, 1, uncertain_since)

    assert outbox.age_out(row(NOW - 3600, None), NOW) is None
    assert outbox.age_out(row(NOW - 30 * 86400, None), NOW) is None  # answered attempts only: still safe
    assert outbox.age_out(row(NOW - 36 * 86400, None), NOW) == outbox.EXPIRED
    assert outbox.age_out(row(NOW - 3600, NOW - 22 * 3600), NOW) is None
    assert outbox.age_out(row(NOW - 3600, NOW - 24 * 3600), NOW) == outbox.UNCONFIRMED


def test_backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() -> None:
    rng = random.Random(7)
    for attempts, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (10, 60.0), (30, 60.0)):
        waits = [backoff(attempts, 60.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > ceiling / 4  # it is random


def test_stripe_errors_are_classified_by_what_the_library_raises() -> None:
    dup = stripe.InvalidRequestError("An event already exists with identifier cd1:x.", None, http_status=400)
    assert classify(dup).kind == "duplicate"
    assert classify(stripe.InvalidRequestError("No such customer: 'cus_x'", "p", http_status=400)).kind == "rejected"
    limited = classify(stripe.RateLimitError("Request rate limit exceeded", http_status=429))
    assert (limited.kind, limited.pause, limited.uncertain) == ("retry", True, False)
    assert classify(stripe.APIConnectionError("reset")).uncertain
    assert classify(stripe.APIError("boom", http_status=500)).uncertain
    assert classify(stripe.TemporarySessionExpiredError(message="expired", http_status=401)).kind == "session"


def test_v2_timestamps_are_utc_rfc3339() -> None:
    assert rfc3339(1_764_547_200) == "2025-12-01T00:00:00Z"
