"""Key management over REST (`/v1/keys`) against the real gateway: admin keys only, revocation takes hold.

The gateway serves these routes itself (its AuthServicer), so they are checked here end to end:
an admin key creates, lists and revokes; the revoked key is refused within the auth cache bound;
a key without the admin scope is 403 on every route, exactly as PERMISSION_DENIED over gRPC.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from tests.gateway_svc.rest.e2e.conftest import RestStack
from tests.support.procs import ROOT

TENANT = "tenant-rest-keys"
# CYBERDESK_AUTH_CACHE_SECONDS is 5 s by default; the wait is generous for a loaded machine.
REVOKED_WITHIN = 30.0


def _admin_key(stack: RestStack) -> str:
    """An admin key made with the gateway's CLI on its state dir (as an operator's first key is)."""
    out = subprocess.run(
        [sys.executable, "-m", "gateway_svc", "keys", "create", "--tenant", "ops", "--name", "rest-admin", "--admin"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CYBERDESK_STATE_DIR": str(stack.state)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return next(line.split()[1] for line in out.splitlines() if line.startswith("secret"))


def test_admin_creates_lists_and_revokes_a_key(rest_stack: RestStack) -> None:
    admin = {"authorization": f"Bearer {_admin_key(rest_stack)}"}
    with httpx.Client(base_url=rest_stack.base_url, headers=admin, timeout=60) as client:
        made = client.post(
            "/v1/keys",
            json={"tenantId": TENANT, "name": "made-over-rest", "rateLimit": {"limit": 50, "window": "1s"}},
        )
        assert made.status_code == 200, made.text
        body = made.json()
        key, secret = body["apiKey"], body["secret"]
        assert key["tenantId"] == TENANT and key["scopes"] == ["instances"], key
        assert key["rateLimit"] == {"limit": 50, "window": "1s"}, key
        assert secret.startswith(key["prefix"])

        # The new key works at once: it lists its tenant's (no) instances.
        with httpx.Client(base_url=rest_stack.base_url, headers={"x-api-key": secret}, timeout=60) as made_client:
            assert made_client.get("/v1/instances").status_code == 200

            listed = client.get("/v1/keys", params={"tenantId": TENANT})
            assert listed.status_code == 200, listed.text
            assert [k["keyId"] for k in listed.json()["apiKeys"]] == [key["keyId"]]
            assert "revokeTime" not in listed.json()["apiKeys"][0]

            revoked = client.delete(f"/v1/keys/{key['keyId']}")
            assert revoked.status_code == 200, revoked.text
            assert revoked.json()["apiKey"]["revokeTime"]
            assert client.get("/v1/keys", params={"tenantId": TENANT}).json()["apiKeys"][0]["revokeTime"]

            deadline = time.monotonic() + REVOKED_WITHIN
            while (status := made_client.get("/v1/instances").status_code) == 200 and time.monotonic() < deadline:
                time.sleep(0.25)
            assert status == 401, f"the revoked key still answered {status} after {REVOKED_WITHIN} s"

        assert client.delete("/v1/keys/k-000000000000").status_code == 404
        bad = client.post("/v1/keys", json={"tenantId": TENANT, "name": "x", "scopes": ["root"]})
        assert bad.status_code == 400 and "unknown scopes" in bad.json()["message"], bad.text
        assert client.get("/v1/keys").status_code == 400  # tenantId is required


def test_a_key_without_the_admin_scope_is_403_on_every_route(rest_stack: RestStack) -> None:
    with rest_stack.client("main") as client:
        answers = [
            client.post("/v1/keys", json={"tenantId": TENANT, "name": "nope"}),
            client.get("/v1/keys", params={"tenantId": TENANT}),
            client.delete("/v1/keys/k-000000000000"),
        ]
    for r in answers:
        assert r.status_code == 403, (r.request.method, r.text)
        assert r.json()["code"] == 7  # PERMISSION_DENIED, as over gRPC
    with rest_stack.client(None) as anonymous:
        assert anonymous.get("/v1/keys", params={"tenantId": TENANT}).status_code == 401


def test_verify_key_has_no_route(rest_stack: RestStack) -> None:
    with rest_stack.client("main") as client:
        assert client.post("/v1/keys:verify", json={"key": "cd_x"}).status_code == 404


def test_the_served_document_has_the_key_routes_tagged_operator(rest_stack: RestStack) -> None:
    paths = httpx.get(f"{rest_stack.base_url}/openapi.json", timeout=30).json()["paths"]
    operations = [paths["/v1/keys"]["post"], paths["/v1/keys"]["get"], paths["/v1/keys/{key_id}"]["delete"]]
    assert [op["operationId"] for op in operations] == [
        "AuthService_CreateKey",
        "AuthService_ListKeys",
        "AuthService_RevokeKey",
    ]
    assert all(op["tags"] == ["AuthService", "operator"] for op in operations)
    assert not any("verify" in path.lower() for path in paths)
