"""Stripe webhooks: `POST /v1/billing/stripe/webhook` moves a tenant's plan.

Served by billing_svc itself on CYBERDESK_BILLING_WEBHOOK_ADDR (default 127.0.0.1:50072), only
when CYBERDESK_STRIPE_WEBHOOK_SECRET (the endpoint's `whsec_...`) is set. Why here and not behind
the gateway: the signature over the raw body is the request's whole authentication (no API key,
no tenant, nothing the gateway's admission could check), the raw bytes must reach the verifier
untouched, and the plan store is in this process. Expose this one path (a reverse proxy or an
Ingress rule), not the port's other paths: there are none, every other path is 404.

Each delivery, in order:

1. Body at most 1 MiB; `Stripe-Signature` checked on the raw bytes by
   `stripe.Webhook.construct_event` (HMAC-SHA256, any of several `v1=` during secret rotation,
   timestamp within 300 s, so a captured delivery cannot be replayed later): 400 otherwise.
2. Deduplicated by `event.id` in `stripe_webhook_events` (ledger database): a repeat is 200 and
   changes nothing (Stripe retries for days, and an attacker may replay within the tolerance).
3. Order is not assumed. Each plan change carries the event's `created` as its effective time;
   the plan store keeps the newest (`Ledger.set_plan`), so an older event delivered late is
   recorded and ignored. Two events of the same second apply in arrival order.
4. What moves the plan (`decide`, pure): `customer.subscription.created|updated` with status
   active or trialing -> the subscription's plan (its `metadata.cyberdesk_plan`, else the first
   item's `price.lookup_key`, else that price's `metadata.cyberdesk_plan`); with any other status
   (past_due, unpaid, canceled, incomplete, paused) -> CYBERDESK_STRIPE_LAPSED_PLAN (default
   `free`); `customer.subscription.deleted` and `invoice.payment_failed` -> the lapsed plan;
   `invoice.paid` -> back to the plan of the tenant's latest subscription, unless it ended.
   The tenant is the one whose Stripe customer the event names (`stripe_customers`, filled when
   billing_svc creates customers), else the subscription's `metadata.cyberdesk_tenant`.
5. The plan is stored first and the event id after it: a crash between the two makes Stripe's
   retry apply the same change again, which is idempotent.

Answers: 200 for processed, duplicate and ignored events (unknown customer or plan: retrying
would not help; the outcome is logged and kept in `stripe_webhook_events`), 400 for a bad
signature or body, 500 when storing failed (Stripe retries).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import stripe

from billing_svc import outbox, plans
from billing_svc.plans import Plan
from cyberdesk_common.config import ConfigError, env_str

_log = logging.getLogger("billing_svc.webhooks")

PATH = "/v1/billing/stripe/webhook"
MAX_BODY = 1024 * 1024
US = 1_000_000
ACTIVE = ("active", "trialing")
ENDED = ("canceled", "incomplete_expired")
SUBSCRIPTION_EVENTS = (
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS stripe_webhook_events (
    event_id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    created INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    outcome TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS stripe_subscriptions (
    customer_id TEXT PRIMARY KEY,
    subscription_id TEXT NOT NULL,
    plan TEXT NOT NULL,
    status TEXT NOT NULL,
    event_created INTEGER NOT NULL
);
"""

Scope = MutableMapping[str, Any]
Receive = Callable[[], Any]
Send = Callable[[MutableMapping[str, Any]], Any]


class PlanStore(Protocol):
    """The part of the ledger webhooks move (billing_svc.ledger.Ledger.set_plan)."""

    def set_plan(self, tenant: str, plan: Plan, effective_us: int, source: str, now_us: int) -> tuple[bool, Plan]: ...


@dataclass(frozen=True)
class Subscription:
    """What a subscription event says about a customer's subscription."""

    subscription_id: str
    plan: str  # "" when the subscription names no plan
    status: str
    created: int  # the event's created time


@dataclass(frozen=True)
class Decision:
    """What a webhook event does: move `tenant` to `plan` (or nothing, with `outcome` saying why)."""

    outcome: str  # "plan", "ignored", "unknown_customer", "unknown_plan"
    plan: str = ""
    subscription: Subscription | None = None


def plan_of_subscription(obj: Mapping[str, Any]) -> str:
    """The plan a Stripe subscription object names (see the module docstring), or ""."""
    metadata = obj.get("metadata") or {}
    if metadata.get("cyberdesk_plan"):
        return str(metadata["cyberdesk_plan"])
    items = ((obj.get("items") or {}).get("data")) or []
    if items:
        price = items[0].get("price") or {}
        if price.get("lookup_key"):
            return str(price["lookup_key"])
        if (price.get("metadata") or {}).get("cyberdesk_plan"):
            return str(price["metadata"]["cyberdesk_plan"])
    return ""


def decide(
    event_type: str,
    obj: Mapping[str, Any],
    created: int,
    latest: Subscription | None,
    lapsed_plan: str,
    known_plans: Mapping[str, Plan],
) -> Decision:
    """The plan an event moves its tenant to (pure; `latest` is the customer's stored subscription)."""
    if event_type in SUBSCRIPTION_EVENTS:
        status = "canceled" if event_type.endswith(".deleted") else str(obj.get("status") or "")
        sub = Subscription(str(obj.get("id") or ""), plan_of_subscription(obj), status, created)
        if status not in ACTIVE:
            return Decision("plan", lapsed_plan, sub)
        if sub.plan not in known_plans:
            return Decision("unknown_plan", sub.plan, sub)
        return Decision("plan", sub.plan, sub)
    if event_type == "invoice.payment_failed":
        return Decision("plan", lapsed_plan)
    if event_type == "invoice.paid":
        if latest is None or latest.status in ENDED or latest.plan not in known_plans:
            return Decision("ignored")
        return Decision("plan", latest.plan)
    return Decision("ignored")


class WebhookHandler:
    """Verifies, deduplicates and applies deliveries; the database work runs on one thread of its own."""

    def __init__(
        self,
        secret: str,
        store: PlanStore,
        db_path: Path,
        *,
        lapsed_plan: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret = secret
        self.store = store
        self.lapsed_plan = lapsed_plan or env_str("STRIPE_LAPSED_PLAN", "free")
        if self.lapsed_plan not in plans.CATALOG:
            raise ConfigError(
                f"CYBERDESK_STRIPE_LAPSED_PLAN={self.lapsed_plan!r}: use one of {', '.join(sorted(plans.CATALOG))}"
            )
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stripe-webhooks")
        self._conn = sqlite3.connect(db_path, timeout=30.0, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.executescript(SCHEMA)
        outbox.ensure_schema(self._conn)  # stripe_customers: who a customer is

    def close(self) -> None:
        """Release the database connection and thread."""
        self._executor.shutdown(wait=True)
        self._conn.close()

    async def handle(self, body: bytes, signature: str | None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON answer) for one delivery."""
        try:
            event = stripe.Webhook.construct_event(body, signature, self.secret)
        except stripe.SignatureVerificationError:
            _log.warning("stripe webhook with a bad or missing signature refused")
            return 400, {"error": "bad signature"}
        except ValueError:
            return 400, {"error": "the body is not a Stripe event"}
        try:
            event_id, event_type, created = str(event["id"]), str(event["type"]), int(event["created"])
            obj = json.loads(body)["data"]["object"]
        except (KeyError, TypeError, ValueError):
            return 400, {"error": "the body is not a Stripe event"}
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._apply, event_id, event_type, created, obj
            )
        except (sqlite3.Error, OSError) as err:
            _log.error("stripe webhook not stored; Stripe will retry", extra={"event": event_id, "error": str(err)})
            return 500, {"error": "not stored; retry"}
        return 200, {"received": True, "outcome": outcome}

    def _apply(self, event_id: str, event_type: str, created: int, obj: Mapping[str, Any]) -> str:
        conn = self._conn
        if conn.execute("SELECT 1 FROM stripe_webhook_events WHERE event_id = ?", (event_id,)).fetchone():
            return "duplicate"
        customer = str(obj.get("customer") or "")
        if event_type in SUBSCRIPTION_EVENTS or event_type.startswith("invoice."):
            tenant = outbox.tenant_of(conn, customer) if customer else None
            tenant = tenant or str((obj.get("metadata") or {}).get("cyberdesk_tenant") or "") or None
        else:
            tenant = None
        latest = self._latest(customer)
        decision = decide(event_type, obj, created, latest, self.lapsed_plan, plans.CATALOG)
        outcome = decision.outcome
        if tenant is None and outcome != "ignored":
            outcome = "unknown_customer"
        elif outcome == "plan" and tenant is not None:
            applied, _ = self.store.set_plan(
                tenant,
                plans.CATALOG[decision.plan],
                created * US,
                f"stripe:{event_id}",
                int(self.clock() * US),
            )
            outcome = f"plan:{decision.plan}" if applied else "stale"
        if outcome not in ("plan", "ignored") and not outcome.startswith("plan:"):
            _log.warning(
                "stripe webhook left the plan as it is",
                extra={"event": event_id, "type": event_type, "outcome": outcome},
            )
        with conn:
            sub = decision.subscription
            if sub is not None and customer and outcome != "unknown_customer":
                # The newest subscription state by event time, for invoice.paid to return to.
                conn.execute(
                    "INSERT INTO stripe_subscriptions (customer_id, subscription_id, plan, status, event_created)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (customer_id) DO UPDATE SET"
                    " subscription_id = excluded.subscription_id, plan = excluded.plan, status = excluded.status,"
                    " event_created = excluded.event_created WHERE excluded.event_created >= event_created",
                    (customer, sub.subscription_id, sub.plan, sub.status, sub.created),
                )
            conn.execute(
                "INSERT OR IGNORE INTO stripe_webhook_events (event_id, type, created, received_at, tenant, outcome)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (event_id, event_type, created, int(self.clock()), tenant or "", outcome),
            )
        _log.info("stripe webhook", extra={"event": event_id, "type": event_type, "outcome": outcome})
        return outcome

    def _latest(self, customer: str) -> Subscription | None:
        row = self._conn.execute(
            "SELECT subscription_id, plan, status, event_created FROM stripe_subscriptions WHERE customer_id = ?",
            (customer,),
        ).fetchone()
        return None if row is None else Subscription(row[0], row[1], row[2], int(row[3]))


class WebhookApp:
    """The ASGI app: one path, POST only, the raw body to the handler."""

    def __init__(self, handler: WebhookHandler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != PATH:
            await _respond(send, 404, {"error": f"not found; the webhook is POST {PATH}"})
            return
        if scope["method"] != "POST":
            await _respond(send, 405, {"error": "use POST"})
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                await _respond(send, 413, {"error": f"body larger than {MAX_BODY} bytes"})
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        status, answer = await self.handler.handle(b"".join(chunks), headers.get("stripe-signature"))
        await _respond(send, status, answer)


async def _respond(send: Send, status: int, answer: Mapping[str, Any]) -> None:
    body = json.dumps(answer).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class WebhookServer:
    """uvicorn serving WebhookApp in this event loop (its own signal handlers off: gRPC owns SIGTERM)."""

    def __init__(self, handler: WebhookHandler, addr: str) -> None:
        self.handler = handler
        self.addr = addr
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen on `addr`."""
        import uvicorn

        host, _, port = self.addr.rpartition(":")
        config = uvicorn.Config(
            WebhookApp(self.handler),
            host=host.strip("[]"),
            port=int(port),
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        config.load()
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup()
        except SystemExit:  # uvicorn exits when it cannot bind; it logged why
            raise OSError(f"the Stripe webhook endpoint cannot listen on {self.addr}") from None
        self._server = server
        self._task = asyncio.create_task(server.main_loop())
        _log.info("stripe webhook endpoint listening", extra={"addr": self.addr, "path": PATH})

    async def stop(self) -> None:
        """Finish in-flight deliveries (bounded) and close."""
        server, task = self._server, self._task
        self._server, self._task = None, None
        if server is not None and task is not None:
            server.should_exit = True
            await task
            await server.shutdown()
        self.handler.close()
