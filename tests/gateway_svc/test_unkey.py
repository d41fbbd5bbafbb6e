"""The Unkey backend: a real gateway process and the real unkey-py client against a local HTTP
server that speaks Unkey's `POST /v2/keys.verifyKey` (Unkey's hosted API cannot run here)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from cyberdesk_proto.v1 import instance_pb2, instance_pb2_grpc
from tests.gateway_svc.conftest import Stack, gateway_env
from tests.support.procs import free_port, service

ROOT_KEY = "unkey_root_test"
SEEN: list[dict[str, object]] = []

ANSWERS: dict[str, dict[str, object]] = {
    "uk_valid": {
        "valid": True,
        "code": "VALID",
        "keyId": "key_123",
        "name": "ci",
        "enabled": True,
        "identity": {"id": "id_1", "externalId": "tenant-a", "meta": {}},
        "ratelimits": [
            {
                "exceeded": False,
                "id": "rl_1",
                "name": "requests",
                "limit": 100,
                "duration": 1000,
                "reset": 1000,
                "remaining": 99,
                "autoApply": True,
            }
        ],
    },
    "uk_other_tenant": {"valid": True, "code": "VALID", "keyId": "key_9", "meta": {"tenant_id": "tenant-b"}},
    "uk_disabled": {"valid": False, "code": "DISABLED", "keyId": "key_456"},
    "uk_limited": {
        "valid": False,
        "code": "RATE_LIMITED",
        "keyId": "key_789",
        "ratelimits": [
            {
                "exceeded": True,
                "id": "rl_2",
                "name": "requests",
                "limit": 1,
                "duration": 60000,
                "reset": 30000,
                "remaining": 0,
                "autoApply": True,
            }
        ],
    },
    "uk_no_credits": {"valid": False, "code": "USAGE_EXCEEDED", "keyId": "key_0", "credits": 0},
}


class _Unkey(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        SEEN.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.headers.get("Authorization") != f"Bearer {ROOT_KEY}":
            self._send(
                401,
                {
                    "meta": {"requestId": "req_x"},
                    "error": {
                        "title": "Unauthorized",
                        "detail": "bad root key",
                        "status": 401,
                        "type": "https://unkey.com/docs/errors/unauthorized",
                    },
                },
            )
            return
        data = ANSWERS.get(body.get("key", ""), {"valid": False, "code": "NOT_FOUND"})
        self._send(200, {"meta": {"requestId": "req_1"}, "data": data})

    def _send(self, status: int, payload: dict[str, object]) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def unkey_gateway(stack: Stack) -> Iterator[str]:
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Unkey)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    addr = f"127.0.0.1:{free_port()}"
    env = gateway_env(
        stack.tmp / "unkey-state",
        stack.instance_addr,  # type: ignore[attr-defined]
        stack.redis_url,
        CYBERDESK_GATEWAY_ADDR=addr,
        CYBERDESK_UNKEY_ROOT_KEY=ROOT_KEY,
        CYBERDESK_UNKEY_API_ID="api_test",
        CYBERDESK_UNKEY_SERVER_URL=f"http://127.0.0.1:{http.server_address[1]}",
    )
    (stack.tmp / "unkey-gw").mkdir(exist_ok=True)
    try:
        with service("gateway_svc", addr, env, stack.tmp / "unkey-gw") as svc:
            yield addr
        assert ROOT_KEY not in svc.log() and "uk_valid" not in svc.log()
    finally:
        http.shutdown()
        http.server_close()


def _get(addr: str, key: str, instance_id: str = "i-a") -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(addr) as channel:
        stub = instance_pb2_grpc.InstanceServiceStub(channel)
        try:
            stub.GetInstance(
                instance_pb2.GetInstanceRequest(instance_id=instance_id), metadata=(("x-api-key", key),), timeout=10
            )
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def test_unkey_valid_key_acts_for_its_identity(unkey_gateway: str) -> None:
    assert _get(unkey_gateway, "uk_valid") == (grpc.StatusCode.OK, "")
    call = next(
        s
        for s in SEEN
        if s["body"] == {"key": "uk_valid"} or (isinstance(s["body"], dict) and s["body"].get("key") == "uk_valid")
    )
    assert call["path"] == "/v2/keys.verifyKey" and call["auth"] == f"Bearer {ROOT_KEY}"
    # The identity is the tenant: tenant-a's key cannot see tenant-b's instance, and meta.tenant_id works too.
    assert _get(unkey_gateway, "uk_valid", "i-b")[0] is grpc.StatusCode.NOT_FOUND
    assert _get(unkey_gateway, "uk_other_tenant", "i-b") == (grpc.StatusCode.OK, "")


def test_unkey_refusals_map_to_precise_codes(unkey_gateway: str) -> None:
    assert _get(unkey_gateway, "uk_unknown")[0] is grpc.StatusCode.UNAUTHENTICATED
    code, details = _get(unkey_gateway, "uk_disabled")
    assert code is grpc.StatusCode.UNAUTHENTICATED and "revoked or disabled" in details
    assert _get(unkey_gateway, "uk_limited")[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    code, details = _get(unkey_gateway, "uk_no_credits")
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "credits" in details
