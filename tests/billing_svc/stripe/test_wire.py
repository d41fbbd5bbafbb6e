"""The deliverer's stream request is the one the `stripe` library's own create_async sends.

`StripeDelivery._post_stream` skips the library's form-encoding pass (docs/billing.md,
"Delivery") but must stay the library's request: same method, URL, body bytes and headers,
and the same exceptions for Stripe's error answers. A real HTTP server on loopback records what
each path puts on the wire; the two are compared (the Idempotency-Key is a fresh uuid per request
in both, and the telemetry header reports the previous request, so those two are compared by
shape).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import stripe

from billing_svc.stripe_delivery import StripeDelivery, StripeSettings

TOKEN = "mes_tok_wire"
EVENTS = [
    {
        "event_name": "cyberdesk_vcpu_seconds",
        "identifier": f"cd1:i-wire-{k}:vcpu_seconds:1764547200",
        "timestamp": "2025-12-01T00:00:59Z",
        "payload": {"stripe_customer_id": "cus_wire", "value": str(k + 1)},
    }
    for k in range(100)
]


class _Recorder:
    """An HTTP server on loopback that records each request and answers with `answer`."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.answer: tuple[int, bytes] = (200, b"{}")
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.seen.append(
                    {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                )
                status, reply = recorder.answer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.send_header("Request-Id", f"req_wire{len(recorder.seen)}")
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def recorder() -> Iterator[_Recorder]:
    r = _Recorder()
    yield r
    r.server.shutdown()
    r.server.server_close()


def _delivery(recorder: _Recorder, tmp_path: Path) -> StripeDelivery:
    return StripeDelivery(StripeSettings("sk_test_wire", recorder.url, recorder.url, timeout=5.0), tmp_path / "l.db")


async def _both(delivery: StripeDelivery) -> None:
    await delivery.client.v2.billing.meter_event_stream.create_async(
        {"events": EVENTS},  # type: ignore[typeddict-item]
        options={"api_key": TOKEN},
    )
    await delivery._post_stream(json.dumps({"events": EVENTS}), TOKEN)


def test_stream_request_is_the_librarys(recorder: _Recorder, tmp_path: Path) -> None:
    asyncio.run(_both(_delivery(recorder, tmp_path)))
    library, ours = recorder.seen
    assert ours["path"] == library["path"] == "/v2/billing/meter_event_stream"
    assert ours["body"] == library["body"]
    assert json.loads(ours["body"]) == {"events": EVENTS}
    varying = {"idempotency-key", "x-stripe-client-telemetry"}
    assert {k: v for k, v in ours["headers"].items() if k not in varying} == {
        k: v for k, v in library["headers"].items() if k not in varying
    }
    assert ours["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert ours["headers"]["content-type"] == "application/json"
    assert ours["headers"]["idempotency-key"] != library["headers"]["idempotency-key"]
    # Each request reports the one before it, as the library's telemetry does.
    assert json.loads(ours["headers"]["x-stripe-client-telemetry"])["last_request_metrics"]["request_id"] == "req_wire1"


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (401, {"type": "temporary_session_expired", "message": "expired"}, stripe.TemporarySessionExpiredError),
        (429, {"type": "invalid_request_error", "message": "slow down", "code": "rate_limit"}, stripe.RateLimitError),
        (400, {"type": "invalid_request_error", "message": "bad events"}, stripe.InvalidRequestError),
        (500, {"type": "api_error", "message": "boom"}, stripe.APIError),
    ],
)
def test_stream_errors_are_the_librarys(
    recorder: _Recorder, tmp_path: Path, status: int, error: dict[str, str], expected: type[Exception]
) -> None:
    recorder.answer = (status, json.dumps({"error": error}).encode())
    delivery = _delivery(recorder, tmp_path)

    async def raised() -> list[BaseException]:
        out: list[BaseException] = []
        for send in (
            delivery.client.v2.billing.meter_event_stream.create_async(
                {"events": EVENTS[:1]},  # type: ignore[typeddict-item]
                options={"api_key": TOKEN},
            ),
            delivery._post_stream(json.dumps({"events": EVENTS[:1]}), TOKEN),
        ):
            with pytest.raises(stripe.StripeError) as info:
                await send
            out.append(info.value)
        return out

    library, ours = asyncio.run(raised())
    assert type(ours) is type(library) and isinstance(ours, expected)
    assert (ours.http_status, ours.user_message, ours.code) == (library.http_status, library.user_message, library.code)
