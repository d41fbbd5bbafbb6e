"""Keys verified through Unkey bring their identity's plan to billing_svc.

A real gateway process with the Unkey backend (the real unkey-py client against the Unkey
stand-in of tests/gateway_svc/test_unkey.py, which speaks `POST /v2/keys.verifyKey`) in front of
the package's billing_svc. A tenant's plan is read through the gateway (BillingService.GetPlan
with the Unkey key) and from billing_svc itself (where it came from).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import grpc
import pytest

from cyberdesk_proto.v1 import billing_pb2, billing_pb2_grpc
from cyberdesk_stack.processes import free_port, service
from tests.billing_svc.stripe.conftest import StripeStack
from tests.gateway_svc.test_unkey import ANSWERS, ROOT_KEY, _Unkey

KEYS = {
    "uk_plan_pro": {
        "valid": True,
        "code": "VALID",
        "keyId": "key_pro",
        "identity": {"id": "id_pro", "externalId": "t-unkey-pro", "meta": {"plan": "pro"}},
    },
    "uk_plan_key_meta": {
        "valid": True,
        "code": "VALID",
        "keyId": "key_km",
        "meta": {"tenant_id": "t-unkey-km", "plan": "free"},
    },
    "uk_plan_unknown": {
        "valid": True,
        "code": "VALID",
        "keyId": "key_gold",
        "identity": {"id": "id_gold", "externalId": "t-unkey-gold", "meta": {"plan": "gold-unlimited"}},
    },
    "uk_no_plan": {
        "valid": True,
        "code": "VALID",
        "keyId": "key_none",
        "identity": {"id": "id_none", "externalId": "t-unkey-none", "meta": {}},
    },
}


@pytest.fixture(scope="module")
def unkey_gateway(stripe_stack: StripeStack) -> Iterator[str]:
    ANSWERS.update(KEYS)
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Unkey)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    addr = f"127.0.0.1:{free_port()}"
    env = {
        "CYBERDESK_STATE_DIR": str(stripe_stack.tmp / "gw-state"),
        "CYBERDESK_INSTANCE_ADDR": f"127.0.0.1:{free_port()}",  # not called by these tests
        "CYBERDESK_BILLING_ADDR": stripe_stack.billing_addr,
        "CYBERDESK_INTERNAL_TOKEN": stripe_stack.token,
        "CYBERDESK_REDIS_URL": stripe_stack.redis_url,
        "CYBERDESK_GATEWAY_ADDR": addr,
        "CYBERDESK_GATEWAY_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "CYBERDESK_UNKEY_ROOT_KEY": ROOT_KEY,
        "CYBERDESK_UNKEY_API_ID": "api_test",
        "CYBERDESK_UNKEY_SERVER_URL": f"http://127.0.0.1:{http.server_address[1]}",
    }
    (stripe_stack.tmp / "gw-log").mkdir(exist_ok=True)
    try:
        with service("gateway_svc", addr, env, stripe_stack.tmp / "gw-log", timeout=60) as svc:
            yield addr
        assert ROOT_KEY not in svc.log()
    finally:
        http.shutdown()
        http.server_close()
        for key in KEYS:
            ANSWERS.pop(key, None)


def _plan_through_gateway(addr: str, key: str) -> str:
    with grpc.insecure_channel(addr) as channel:
        reply = billing_pb2_grpc.BillingServiceStub(channel).GetPlan(
            billing_pb2.GetPlanRequest(), metadata=(("x-api-key", key),), timeout=20
        )
    return reply.plan.name


def test_the_identity_plan_reaches_billing(stripe_stack: StripeStack, unkey_gateway: str) -> None:
    assert _plan_through_gateway(unkey_gateway, "uk_plan_pro") == "pro"
    reply = stripe_stack.plan_of("t-unkey-pro")
    assert (reply.plan.name, reply.source) == ("pro", "unkey:id_pro")
    assert reply.plan.max_instances == 20  # the catalog's "pro", limits and all
    # A key without an identity names its plan in its own meta.
    assert _plan_through_gateway(unkey_gateway, "uk_plan_key_meta") == "free"
    assert stripe_stack.plan_of("t-unkey-km").source == "unkey:key_km"


def test_no_plan_or_an_unknown_one_leaves_the_plan_and_the_call_alone(
    stripe_stack: StripeStack, unkey_gateway: str
) -> None:
    assert _plan_through_gateway(unkey_gateway, "uk_no_plan") == "local"
    assert stripe_stack.plan_of("t-unkey-none").source == "default"
    # billing refuses a name outside its catalog; the caller's request still goes through.
    assert _plan_through_gateway(unkey_gateway, "uk_plan_unknown") == "local"
    assert stripe_stack.plan_of("t-unkey-gold").source == "default"
