"""A stand-in for Stripe's hosted API, for testing billing_svc: `python -m billing_svc.stripe_standin`.

Stripe cannot run here, so tests and bench/billing_pipeline.py point the real `stripe` library
(16.1.0) at this HTTP server on loopback. It speaks the wire protocol that library speaks
(facts in ../shared/design/BILLING.md), so what the tests exercise is the library's own request
encoding, retries and exception mapping:

- v1 (form-encoded, `Authorization: Bearer <secret key>`): `POST /v1/customers`, `GET
  /v1/customers/{id}`, `POST /v1/billing/meter_events` (identifier unique: a repeat is HTTP 400
  `invalid_request_error` "An event already exists with identifier ..." with
  `Stripe-Should-Retry: false`), `POST|GET /v1/billing/meters`, `GET
  /v1/billing/meters/{id}/event_summaries`. POSTs honour `Idempotency-Key` as Stripe does: the
  same key and parameters replay the first answer (`Idempotent-Replayed: true`), other
  parameters are an `idempotency_error`.
- v2 (JSON): `POST /v2/billing/meter_event_session` returns an `authentication_token` valid for
  `session_ttl` seconds (Stripe: 15 minutes; tests make it shorter); `POST
  /v2/billing/meter_event_stream` takes 1 to 100 events with `Authorization: Bearer <token>`,
  answers `{}`, and an expired or unknown token is 401 `temporary_session_expired`
  (`billing_meter_event_session_expired`). As at Stripe the stream validates asynchronously: a
  repeated identifier is accepted and dropped, a bad event is recorded as rejected, never a
  synchronous error.
- Errors are `{"error": {"type", "message", "code"?, "param"?}}` with a `Request-Id` header.

Faults, queued per route (`inject`) or drawn at random (`fail_randomly`): HTTP 500, HTTP 429
without retry headers, a connection closed before the request is processed or after it was
processed but before the answer, added latency, and `Hold`: the request waits at a stage (before
processing, after processing before the answer) until the test releases it, so a test can kill
billing_svc exactly there.

What it accepted is recorded (`accepted()`): each identifier once, with its value; every
submission is counted (`submissions`), and an identifier sent again with a different payload is
recorded in `conflicts` (Stripe would silently keep the first: that is double or lost billing).
Run as a process, the same records and faults are reached over `/_standin/...` on the same port
(`StandinControl`), which the benchmark uses.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import random
import secrets
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Routes faults are queued for (and "*" for any route).
ROUTES = ("customers", "meters", "v1_meter_events", "v2_session", "v2_stream")
FAULT_KINDS = ("status_500", "status_429", "drop_before", "drop_after", "delay", "hold")
IDENTIFIER_MAX = 100
MAX_STREAM_EVENTS = 100
# Stripe's documented bounds on a meter event's timestamp.
TIMESTAMP_PAST_SECONDS = 35 * 24 * 3600
TIMESTAMP_FUTURE_SECONDS = 5 * 60


@dataclass
class Hold:
    """A request that waits at `stage` ("before": nothing processed; "processed": recorded, no answer yet).

    `arrived` is set when a request reaches the stage; it goes on when `release()` is called (or
    after `timeout` seconds). What happens next is `then`: "answer" as usual, or "drop" the
    connection without an answer.
    """

    stage: str = "before"
    then: str = "answer"
    timeout: float = 60.0
    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        """Let the held request go on."""
        self.released.set()


@dataclass
class Fault:
    """One injected fault: `kind` in FAULT_KINDS; `seconds` for "delay"; `hold` for "hold"."""

    kind: str
    seconds: float = 0.0
    hold: Hold | None = None


@dataclass(frozen=True)
class Accepted:
    """A meter event Stripe would have stored."""

    identifier: str
    event_name: str
    customer: str
    value: int
    timestamp: int
    api: str  # "v1" or "v2"
    received_at: float


class _Drop(Exception):
    """Close the connection without an answer."""


class _StripeError(Exception):
    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        code: str = "",
        param: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.code, self.param = status, type_, message, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code:
            error["code"] = self.code
        if self.param:
            error["param"] = self.param
        return {"error": error}


def decode_form(body: str) -> dict[str, Any]:
    """Stripe's form encoding (`a[b][c]=v`, `a[0]=v`) into nested dicts (list indices stay dict keys)."""
    out: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(body, keep_blank_values=True):
        parts = [key.split("[", 1)[0]] + [p.rstrip("]") for p in key.split("[")[1:]]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _rfc3339_to_unix(value: str) -> int:
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())


def _rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class StripeStandin:
    """The stand-in's state and faults; `start()` serves it on loopback in a thread of this process."""

    def __init__(
        self,
        api_key: str = "sk_test_standin",
        *,
        session_ttl: float = 900.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.session_ttl = session_ttl
        self._lock = threading.Lock()
        self._faults: dict[str, deque[Fault]] = {route: deque() for route in (*ROUTES, "*")}
        self._random: dict[str, tuple[float, tuple[str, ...], random.Random]] = {}
        self.customers: dict[str, dict[str, Any]] = {}
        self.meters: dict[str, dict[str, Any]] = {}
        self.events: dict[str, Accepted] = {}
        self.submissions: Counter[str] = Counter()  # identifier -> times it was sent and processed
        self._submitted = 0  # sum of submissions, kept so that count() is O(1) for pollers
        self._total = 0  # sum of the accepted values
        self.conflicts: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []  # v2 events that failed (asynchronous) validation
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status or 0 for a dropped one)
        self.sessions: dict[str, float] = {}  # token -> expires at (unix)
        self._idempotent: dict[str, tuple[str, int, bytes]] = {}  # key -> (params digest, status, body)
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT, the base address for every `base_addresses` entry."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> StripeStandin:
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="stripe-standin", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread (the process mode)."""
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving and release every held request."""
        with self._lock:
            for queue in self._faults.values():
                for fault in queue:
                    if fault.hold is not None:
                        fault.hold.release()
        self._server.shutdown()
        self._server.server_close()

    # -- faults ----------------------------------------------------------------------------------

    def inject(self, route: str, *faults: Fault) -> None:
        """Queue faults for the next requests of `route` (one each, in order; "*" for any route)."""
        if route not in self._faults:
            raise ValueError(f"unknown route {route!r}; one of {', '.join((*ROUTES, '*'))}")
        for fault in faults:
            if fault.kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault {fault.kind!r}; one of {', '.join(FAULT_KINDS)}")
        with self._lock:
            self._faults[route].extend(faults)

    def fail_randomly(self, route: str, rate: float, kinds: Iterable[str], seed: int = 0) -> None:
        """From now on, each request of `route` fails with probability `rate`, with one of `kinds` (0 turns it off)."""
        chosen = tuple(kinds)
        if any(k not in ("status_500", "status_429", "drop_before", "drop_after") for k in chosen):
            raise ValueError("random faults are status_500, status_429, drop_before or drop_after")
        with self._lock:
            if rate <= 0:
                self._random.pop(route, None)
            else:
                self._random[route] = (rate, chosen, random.Random(seed))

    def expire_sessions(self) -> None:
        """End every meter event session now (the next stream request with its token is 401)."""
        with self._lock:
            for token in self.sessions:
                self.sessions[token] = 0.0

    def _next_fault(self, route: str) -> Fault | None:
        with self._lock:
            for key in (route, "*"):
                if self._faults[key]:
                    return self._faults[key].popleft()
            drawn = self._random.get(route)
            if drawn is not None:
                rate, kinds, rng = drawn
                if rng.random() < rate:
                    return Fault(rng.choice(kinds))
        return None

    # -- records ---------------------------------------------------------------------------------

    def accepted(self) -> dict[str, Accepted]:
        """identifier -> the event accepted under it (a copy)."""
        with self._lock:
            return dict(self.events)

    def total(self, event_name: str | None = None, customer: str | None = None) -> int:
        """Sum of the accepted values, optionally of one meter event name and one customer."""
        with self._lock:
            return sum(
                e.value
                for e in self.events.values()
                if (event_name is None or e.event_name == event_name) and (customer is None or e.customer == customer)
            )

    def has(self, identifier: str) -> bool:
        """Whether an event with `identifier` was accepted."""
        with self._lock:
            return identifier in self.events

    def count(self) -> dict[str, int]:
        """How many events were accepted, submitted (repeats included) and in conflict (`/_standin/count`)."""
        with self._lock:
            return {
                "events": len(self.events),
                "submissions": self._submitted,
                "conflicts": len(self.conflicts),
                "total": self._total,
            }

    def state(self) -> dict[str, Any]:
        """Everything recorded, as JSON-able data (what `/_standin/state` answers)."""
        with self._lock:
            return {
                "events": [asdict(e) for e in self.events.values()],
                "submissions": dict(self.submissions),
                "conflicts": list(self.conflicts),
                "rejected": list(self.rejected),
                "customers": list(self.customers.values()),
                "meters": list(self.meters.values()),
                "requests": [list(r) for r in self.requests],
                "sessions": len(self.sessions),
            }

    def _record_event(self, event: Accepted) -> bool:
        """Store `event` unless its identifier is taken; False for a repeat (a conflict is noted)."""
        with self._lock:
            self.submissions[event.identifier] += 1
            self._submitted += 1
            first = self.events.get(event.identifier)
            if first is None:
                self.events[event.identifier] = event
                self._total += event.value
                return True
            if (first.event_name, first.customer, first.value, first.timestamp) != (
                event.event_name,
                event.customer,
                event.value,
                event.timestamp,
            ):
                self.conflicts.append({"first": asdict(first), "again": asdict(event)})
            return False

    # -- the API ---------------------------------------------------------------------------------

    def _check_secret_key(self, headers: Mapping[str, str]) -> None:
        auth = headers.get("authorization", "")
        if not auth:
            raise _StripeError(401, "invalid_request_error", "You did not provide an API key.")
        if auth != f"Bearer {self.api_key}":
            raise _StripeError(401, "invalid_request_error", "Invalid API Key provided: sk_***")

    def _validate_event(
        self, name: Any, identifier: Any, payload: Any, timestamp: int, api: str
    ) -> tuple[str, str, int, str]:
        """(event_name, customer, value, identifier) or a _StripeError naming the parameter."""
        if not isinstance(name, str) or not name:
            raise _StripeError(400, "invalid_request_error", "Missing required param: event_name.", param="event_name")
        if not isinstance(payload, dict):
            raise _StripeError(400, "invalid_request_error", "Missing required param: payload.", param="payload")
        customer = payload.get("stripe_customer_id")
        if not isinstance(customer, str) or not customer:
            raise _StripeError(
                400,
                "invalid_request_error",
                "Missing required param: payload[stripe_customer_id].",
                param="payload[stripe_customer_id]",
            )
        raw_value = payload.get("value")
        try:
            value = int(str(raw_value))
        except ValueError:
            raise _StripeError(
                400,
                "invalid_request_error",
                f"Invalid payload[value]: must be a whole number, got {raw_value!r}",
                param="payload[value]",
            ) from None
        if identifier is None or identifier == "":
            identifier = _new_id("mev")  # Stripe makes one when none is given
        if not isinstance(identifier, str) or len(identifier) > IDENTIFIER_MAX:
            raise _StripeError(
                400,
                "invalid_request_error",
                f"Invalid identifier: must be at most {IDENTIFIER_MAX} characters",
                param="identifier",
            )
        now = time.time()
        if timestamp < now - TIMESTAMP_PAST_SECONDS or timestamp > now + TIMESTAMP_FUTURE_SECONDS:
            raise _StripeError(
                400,
                "invalid_request_error",
                "Invalid timestamp: must be within the past 35 calendar days and not more than 5 minutes in the future",
                param="timestamp",
            )
        if customer not in self.customers:
            raise _StripeError(
                400,
                "invalid_request_error",
                f"No such customer: '{customer}'",
                code="resource_missing",
                param="payload[stripe_customer_id]",
            )
        return name, customer, value, identifier

    def v1_meter_event(self, params: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/billing/meter_events."""
        try:
            timestamp = int(params.get("timestamp") or int(time.time()))
        except ValueError:
            raise _StripeError(400, "invalid_request_error", "Invalid integer: timestamp", param="timestamp") from None
        name, customer, value, identifier = self._validate_event(
            params.get("event_name"), params.get("identifier"), params.get("payload"), timestamp, "v1"
        )
        event = Accepted(identifier, name, customer, value, timestamp, "v1", time.time())
        if not self._record_event(event):
            raise _StripeError(
                400,
                "invalid_request_error",
                f"An event already exists with identifier {identifier}.",
                headers={"Stripe-Should-Retry": "false"},
            )
        return {
            "object": "billing.meter_event",
            "created": int(event.received_at),
            "event_name": name,
            "identifier": identifier,
            "livemode": False,
            "payload": {k: str(v) for k, v in params["payload"].items()},
            "timestamp": timestamp,
        }

    def v2_session(self) -> dict[str, Any]:
        """POST /v2/billing/meter_event_session."""
        now = time.time()
        token = "mes_tok_" + secrets.token_urlsafe(24)
        with self._lock:
            self.sessions[token] = now + self.session_ttl
        return {
            "id": _new_id("mes"),
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": _rfc3339(now),
            "expires_at": _rfc3339(now + self.session_ttl),
            "livemode": False,
        }

    def v2_stream(self, headers: Mapping[str, str], body: dict[str, Any]) -> dict[str, Any]:
        """POST /v2/billing/meter_event_stream (the caller checked the session token)."""
        events = body.get("events")
        if not isinstance(events, list) or not 1 <= len(events) <= MAX_STREAM_EVENTS:
            raise _StripeError(
                400,
                "invalid_request_error",
                f"events must be a list of 1 to {MAX_STREAM_EVENTS} meter events",
                param="events",
            )
        for raw in events:
            raw = raw if isinstance(raw, dict) else {}
            try:
                stamp = raw.get("timestamp")
                timestamp = _rfc3339_to_unix(stamp) if isinstance(stamp, str) else int(time.time())
                name, customer, value, identifier = self._validate_event(
                    raw.get("event_name"), raw.get("identifier"), raw.get("payload"), timestamp, "v2"
                )
            except (_StripeError, ValueError) as err:
                # Validated asynchronously at Stripe: the request succeeds, the event is reported later.
                with self._lock:
                    self.rejected.append({"event": raw, "error": str(err)})
                continue
            self._record_event(Accepted(identifier, name, customer, value, timestamp, "v2", time.time()))
        return {}

    def check_session(self, headers: Mapping[str, str]) -> None:
        """The stream's Bearer token must name a live session."""
        token = headers.get("authorization", "").removeprefix("Bearer ")
        with self._lock:
            expires = self.sessions.get(token)
        if expires is None or expires <= time.time():
            raise _StripeError(
                401,
                "temporary_session_expired",
                "Your meter event session has expired or is not valid. Create a new session and retry.",
                code="billing_meter_event_session_expired",
            )

    def create_customer(self, params: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/customers."""
        customer_id = _new_id("cus")
        customer: dict[str, Any] = {
            "id": customer_id,
            "object": "customer",
            "created": int(time.time()),
            "email": params.get("email"),
            "name": params.get("name"),
            "description": params.get("description"),
            "metadata": dict(params.get("metadata") or {}),
            "livemode": False,
        }
        with self._lock:
            self.customers[customer_id] = customer
        return customer

    def get_customer(self, customer_id: str) -> dict[str, Any]:
        """GET /v1/customers/{id}."""
        with self._lock:
            found = self.customers.get(customer_id)
        if found is None:
            raise _StripeError(
                404, "invalid_request_error", f"No such customer: '{customer_id}'", code="resource_missing", param="id"
            )
        return found

    def create_meter(self, params: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/billing/meters."""
        name = params.get("event_name")
        if not name:
            raise _StripeError(400, "invalid_request_error", "Missing required param: event_name.", param="event_name")
        with self._lock:
            if any(m["event_name"] == name for m in self.meters.values()):
                raise _StripeError(
                    400,
                    "invalid_request_error",
                    f"A meter with event_name {name} already exists.",
                    param="event_name",
                )
            meter = {
                "id": _new_id("mtr"),
                "object": "billing.meter",
                "created": int(time.time()),
                "display_name": params.get("display_name") or name,
                "event_name": name,
                "status": "active",
                "default_aggregation": {"formula": (params.get("default_aggregation") or {}).get("formula", "sum")},
                "customer_mapping": {
                    "event_payload_key": (params.get("customer_mapping") or {}).get(
                        "event_payload_key", "stripe_customer_id"
                    ),
                    "type": "by_id",
                },
                "value_settings": {
                    "event_payload_key": (params.get("value_settings") or {}).get("event_payload_key", "value")
                },
                "livemode": False,
            }
            self.meters[meter["id"]] = meter
        return meter

    def list_meters(self) -> dict[str, Any]:
        """GET /v1/billing/meters."""
        with self._lock:
            data = list(self.meters.values())
        return {"object": "list", "data": data, "has_more": False, "url": "/v1/billing/meters"}

    def event_summaries(self, meter_id: str, query: Mapping[str, str]) -> dict[str, Any]:
        """GET /v1/billing/meters/{id}/event_summaries?customer=&start_time=&end_time=."""
        with self._lock:
            meter = self.meters.get(meter_id)
        if meter is None:
            raise _StripeError(
                404, "invalid_request_error", f"No such billing meter: '{meter_id}'", code="resource_missing"
            )
        for name in ("customer", "start_time", "end_time"):
            if not query.get(name):
                raise _StripeError(400, "invalid_request_error", f"Missing required param: {name}.", param=name)
        start, end = int(query["start_time"]), int(query["end_time"])
        with self._lock:
            total = sum(
                e.value
                for e in self.events.values()
                if e.event_name == meter["event_name"]
                and e.customer == query["customer"]
                and start <= e.timestamp < end
            )
        summary = {
            "id": _new_id("mtrusg"),
            "object": "billing.meter_event_summary",
            "aggregated_value": total,
            "start_time": start,
            "end_time": end,
            "livemode": False,
            "meter": meter_id,
        }
        return {"object": "list", "data": [summary], "has_more": False, "url": f"/v1/billing/meters/{meter_id}"}

    def idempotent(
        self, key: str, params: str, status: int | None = None, body: bytes = b""
    ) -> tuple[int, bytes] | None:
        """Look up (status None) or store the answer of an idempotent POST; raises on other parameters."""
        digest = hashlib.sha256(params.encode()).hexdigest()
        with self._lock:
            if status is not None:
                self._idempotent[key] = (digest, status, body)
                return None
            found = self._idempotent.get(key)
        if found is None:
            return None
        if found[0] != digest:
            raise _StripeError(
                400,
                "idempotency_error",
                "Keys for idempotent requests can only be used with the same parameters they were first used with. "
                f"Try using a key other than '{key}' if you meant to execute a different request.",
            )
        return found[1], found[2]


def _handler(standin: StripeStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the library reuses its connections
        # Headers and body are two writes: without TCP_NODELAY each answer waits out a delayed ACK (40 ms).
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _headers(self) -> dict[str, str]:
            return {k.lower(): v for k, v in self.headers.items()}

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            parsed = urllib.parse.urlsplit(self.path)
            path = parsed.path
            if path.startswith("/_standin/"):
                self._control(method, path, parsed.query, raw)
                return
            route = _route_of(method, path)
            fault = standin._next_fault(route) if route else None
            status = 0
            try:
                status = self._api(method, path, parsed.query, raw, route, fault)
            except _Drop:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
            finally:
                with standin._lock:
                    standin.requests.append((method, path, status))

        def _api(self, method: str, path: str, query: str, raw: bytes, route: str, fault: Fault | None) -> int:
            headers = self._headers()
            if fault is not None:
                if fault.kind == "delay":
                    time.sleep(fault.seconds)
                elif fault.kind == "drop_before":
                    raise _Drop()
                elif fault.kind == "status_500":
                    return self._error(_StripeError(500, "api_error", "An unknown error occurred"))
                elif fault.kind == "status_429":
                    # No Stripe-Should-Retry and no Retry-After: the library does not retry this itself.
                    return self._error(
                        _StripeError(
                            429,
                            "invalid_request_error",
                            "Request rate limit exceeded. Learn more about rate limits here "
                            "https://stripe.com/docs/rate-limits.",
                            code="rate_limit",
                        )
                    )
                elif fault.kind == "hold" and fault.hold is not None and fault.hold.stage == "before":
                    self._hold(fault.hold)
            try:
                status, body, extra = self._dispatch(method, path, query, raw, route, headers)
            except _StripeError as err:
                status, body, extra = err.status, json.dumps(err.body()).encode(), err.headers
            if fault is not None and fault.kind == "drop_after":
                raise _Drop()
            if (
                fault is not None
                and fault.kind == "hold"
                and fault.hold is not None
                and fault.hold.stage == "processed"
            ):
                self._hold(fault.hold)
            return self._send(status, body, extra)

        def _hold(self, hold: Hold) -> None:
            hold.arrived.set()
            hold.released.wait(hold.timeout)
            if hold.then == "drop":
                raise _Drop()

        def _dispatch(
            self, method: str, path: str, query: str, raw: bytes, route: str, headers: Mapping[str, str]
        ) -> tuple[int, bytes, dict[str, str]]:
            text = raw.decode("utf-8", errors="replace")
            if route == "v2_stream":
                standin.check_session(headers)
                try:
                    body = json.loads(text or "{}")
                except json.JSONDecodeError:
                    raise _StripeError(400, "invalid_request_error", "the request body is not JSON") from None
                return 200, json.dumps(standin.v2_stream(headers, body)).encode(), {}
            standin._check_secret_key(headers)
            if route == "v2_session":
                return 200, json.dumps(standin.v2_session()).encode(), {}
            if not route:
                raise _StripeError(
                    404, "invalid_request_error", f"Unrecognized request URL ({method}: {path}).", code="url_invalid"
                )
            key = headers.get("idempotency-key", "") if method == "POST" else ""
            if key:
                replay = standin.idempotent(key, f"{path}?{text}")
                if replay is not None:
                    return replay[0], replay[1], {"Idempotent-Replayed": "true"}
            try:
                status, body, extra = 200, json.dumps(self._v1(method, path, query, decode_form(text))).encode(), {}
            except _StripeError as err:
                status, body, extra = err.status, json.dumps(err.body()).encode(), err.headers
            if key:
                standin.idempotent(key, f"{path}?{text}", status, body)
            return status, body, extra

        def _v1(self, method: str, path: str, query: str, params: dict[str, Any]) -> dict[str, Any]:
            parts = path.strip("/").split("/")
            if path == "/v1/billing/meter_events" and method == "POST":
                return standin.v1_meter_event(params)
            if path == "/v1/customers" and method == "POST":
                return standin.create_customer(params)
            if len(parts) == 3 and parts[:2] == ["v1", "customers"] and method == "GET":
                return standin.get_customer(parts[2])
            if path == "/v1/billing/meters":
                return standin.create_meter(params) if method == "POST" else standin.list_meters()
            if len(parts) == 5 and parts[:3] == ["v1", "billing", "meters"] and parts[4] == "event_summaries":
                return standin.event_summaries(parts[3], dict(urllib.parse.parse_qsl(query)))
            raise _StripeError(404, "invalid_request_error", f"Unrecognized request URL ({method}: {path}).")

        def _error(self, err: _StripeError) -> int:
            return self._send(err.status, json.dumps(err.body()).encode(), err.headers)

        def _send(self, status: int, body: bytes, extra: Mapping[str, str]) -> int:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Request-Id", "req_" + secrets.token_hex(7))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            return status

        def _control(self, method: str, path: str, query: str, raw: bytes) -> None:
            try:
                body = json.loads(raw or b"{}")
                if path == "/_standin/state" and method == "GET":
                    answer: Any = standin.state()
                elif path == "/_standin/count" and method == "GET":
                    answer = standin.count()
                elif path == "/_standin/has" and method == "GET":
                    wanted = dict(urllib.parse.parse_qsl(query)).get("identifier", "")
                    answer = {"identifier": wanted, "accepted": standin.has(wanted)}
                elif path == "/_standin/faults" and method == "POST":
                    faults = [Fault(f["kind"], float(f.get("seconds", 0.0))) for f in body.get("faults", [])]
                    standin.inject(body.get("route", "*"), *faults)
                    answer = {}
                elif path == "/_standin/random_faults" and method == "POST":
                    standin.fail_randomly(
                        body["route"], float(body["rate"]), body.get("kinds", []), int(body.get("seed", 0))
                    )
                    answer = {}
                elif path == "/_standin/expire_sessions" and method == "POST":
                    standin.expire_sessions()
                    answer = {}
                else:
                    self._send(404, b'{"error":"unknown control path"}', {})
                    return
            except (KeyError, ValueError, TypeError) as err:
                self._send(400, json.dumps({"error": str(err)}).encode(), {})
                return
            self._send(200, json.dumps(answer).encode(), {})

    return Handler


def _route_of(method: str, path: str) -> str:
    if path == "/v2/billing/meter_event_stream" and method == "POST":
        return "v2_stream"
    if path == "/v2/billing/meter_event_session" and method == "POST":
        return "v2_session"
    if path == "/v1/billing/meter_events":
        return "v1_meter_events"
    if path.startswith("/v1/billing/meters"):
        return "meters"
    if path.startswith("/v1/customers"):
        return "customers"
    return ""


def sign_webhook(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The `Stripe-Signature` header Stripe sends with `payload`: t=<unix>,v1=<HMAC-SHA256(secret, "t.payload")>."""
    stamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={mac}"


def webhook_event(
    event_type: str, data_object: Mapping[str, Any], *, created: int | None = None, event_id: str | None = None
) -> bytes:
    """The body of a webhook delivery as Stripe writes it (a snapshot `event` object)."""
    return json.dumps(
        {
            "id": event_id or _new_id("evt"),
            "object": "event",
            "api_version": "2025-10-29.clover",
            "created": int(time.time()) if created is None else created,
            "data": {"object": dict(data_object)},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }
    ).encode()


class StandinControl:
    """The faults and records of a stand-in running as a process, over its `/_standin/` paths."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def state(self) -> dict[str, Any]:
        """What the stand-in recorded (StripeStandin.state)."""
        result: dict[str, Any] = self._call("GET", "/_standin/state")
        return result

    def count(self) -> dict[str, int]:
        """As StripeStandin.count."""
        result: dict[str, int] = self._call("GET", "/_standin/count")
        return result

    def has(self, identifier: str) -> bool:
        """Whether an event with `identifier` was accepted."""
        answer = self._call("GET", "/_standin/has?" + urllib.parse.urlencode({"identifier": identifier}))
        return bool(answer["accepted"])

    def inject(self, route: str, *faults: Fault) -> None:
        """Queue faults (no holds across processes)."""
        self._call("POST", "/_standin/faults", {"route": route, "faults": [asdict(f) for f in faults]})

    def fail_randomly(self, route: str, rate: float, kinds: Iterable[str], seed: int = 0) -> None:
        """As StripeStandin.fail_randomly."""
        self._call(
            "POST", "/_standin/random_faults", {"route": route, "rate": rate, "kinds": list(kinds), "seed": seed}
        )

    def expire_sessions(self) -> None:
        """As StripeStandin.expire_sessions."""
        self._call("POST", "/_standin/expire_sessions", {})


def main(argv: list[str] | None = None) -> None:
    """Serve a stand-in until killed: `python -m billing_svc.stripe_standin --port N --api-key K`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="sk_test_standin")
    parser.add_argument("--session-ttl", type=float, default=900.0)
    args = parser.parse_args(argv)
    standin = StripeStandin(args.api_key, session_ttl=args.session_ttl, host=args.host, port=args.port)
    print(standin.url, flush=True)
    standin.serve_forever()


if __name__ == "__main__":
    main()
