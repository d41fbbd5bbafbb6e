"""What billing_svc runs for Stripe, from the environment: the outbox deliverer and the webhook endpoint.

- CYBERDESK_STRIPE_SECRET_KEY set: windows are closed into the outbox and delivered
  (stripe_windows.py, stripe_delivery.py). Unset: neither runs and nothing leaves the machine;
  usage is metered in the ledger all the same.
- CYBERDESK_STRIPE_WEBHOOK_SECRET set: the webhook endpoint listens on
  CYBERDESK_BILLING_WEBHOOK_ADDR (webhooks.py). Unset: no port is opened.

Both are background work of billing_svc (`App.background`): started once the gRPC server
serves, stopped (a send in flight finishes or is abandoned, never half-recorded) when it stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from billing_svc.ledger import Ledger
from cyberdesk_common.config import env_str

_log = logging.getLogger("billing_svc.stripe")

DEFAULT_WEBHOOK_ADDR = "127.0.0.1:50072"


def background(ledger: Ledger) -> list[Callable[[], Coroutine[Any, Any, None]]]:
    """The Stripe work to run beside the meter (empty when nothing is configured)."""
    if not env_str("STRIPE_SECRET_KEY", "") and not env_str("STRIPE_WEBHOOK_SECRET", ""):
        _log.info("no Stripe key configured: usage stays in the local ledger, nothing is reported")
        return []
    # Imported here: the stripe library takes seconds to import on a busy host, and a billing_svc
    # without Stripe configured (the local stack's default) should not pay for it at every start.
    from billing_svc.stripe_delivery import StripeDelivery, StripeSettings
    from billing_svc.stripe_windows import WindowCloser
    from billing_svc.webhooks import WebhookHandler, WebhookServer

    settings = StripeSettings.from_env()
    webhook_secret = env_str("STRIPE_WEBHOOK_SECRET", "")
    work: list[Callable[[], Coroutine[Any, Any, None]]] = []
    if settings is None:
        _log.info("no Stripe key configured: usage stays in the local ledger, nothing is reported")
    else:
        delivery = StripeDelivery(settings, ledger.path, closer=WindowCloser(ledger))
        work.append(lambda: _run_until_cancelled(delivery.start, delivery.close))
    if webhook_secret:
        # Built here, so that a bad CYBERDESK_STRIPE_LAPSED_PLAN fails the start, not the first delivery.
        handler = WebhookHandler(webhook_secret, ledger, ledger.path)
        server = WebhookServer(handler, env_str("BILLING_WEBHOOK_ADDR", DEFAULT_WEBHOOK_ADDR))
        work.append(lambda: _run_until_cancelled(server.start, server.stop))
    return work


async def _run_until_cancelled(
    start: Callable[[], Coroutine[Any, Any, None]], stop: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    try:
        await start()
    except Exception:
        # Metering goes on without it; the log says why (e.g. the webhook port is taken).
        _log.exception("stripe background work could not start")
        return
    try:
        await asyncio.Event().wait()
    finally:
        try:
            await stop()
        except Exception:
            _log.exception("stripe background work did not stop cleanly")
