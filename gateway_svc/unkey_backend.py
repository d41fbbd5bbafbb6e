"""Unkey as the key backend (used when CYBERDESK_UNKEY_ROOT_KEY and CYBERDESK_UNKEY_API_ID are set).

The verify call is Unkey's `POST /v2/keys.verifyKey` through the official `unkey-py` client. Its
answer is mapped onto our `Verification`:

- `code` (VALID, NOT_FOUND, DISABLED, EXPIRED, FORBIDDEN, INSUFFICIENT_PERMISSIONS,
  USAGE_EXCEEDED, RATE_LIMITED) -> `VerifyCode`;
- the tenant is the key's identity (`identity.externalId`), else `meta.tenant_id`; a valid key
  with neither cannot be tied to a tenant and is FORBIDDEN;
- scopes come from `meta.scopes` (default: instances);
- the first of the key's `ratelimits` becomes its per-key limit in our Redis limiter, and an
  exceeded one is RATE_LIMITED with its reset as the retry delay;
- `credits` is the remaining credit count. A key with credits is not cached, so that every call
  spends a credit at Unkey;
- the identity's `meta.plan` (or the key's) is stored as the tenant's plan in billing_svc when it
  changes (`unkey_plans.py`).

Unkey unreachable (or answering with an HTTP error) fails CLOSED with UNAVAILABLE: without the
key service nobody can be authenticated, unlike the rate limiter which may fail open.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
import httpx
from unkey.py import Unkey

from cyberdesk_common.status import RpcError
from cyberdesk_proto.internal.v1 import auth_pb2
from gateway_svc.auth import DEFAULT_SCOPES, Principal, Verification
from gateway_svc.ratelimit import Limit
from gateway_svc.unkey_plans import PlanSync, plan_claim

_log = logging.getLogger("gateway_svc.unkey")

_CODES = {
    "VALID": auth_pb2.VERIFY_CODE_VALID,
    "NOT_FOUND": auth_pb2.VERIFY_CODE_NOT_FOUND,
    "DISABLED": auth_pb2.VERIFY_CODE_REVOKED,
    "EXPIRED": auth_pb2.VERIFY_CODE_EXPIRED,
    "FORBIDDEN": auth_pb2.VERIFY_CODE_FORBIDDEN,
    "INSUFFICIENT_PERMISSIONS": auth_pb2.VERIFY_CODE_FORBIDDEN,
    "USAGE_EXCEEDED": auth_pb2.VERIFY_CODE_USAGE_EXCEEDED,
    "RATE_LIMITED": auth_pb2.VERIFY_CODE_RATE_LIMITED,
}


def map_verify_data(data: Any) -> Verification:
    """Turn Unkey's verify response `data` (unkey-py's V2KeysVerifyKeyResponseData) into a Verification."""
    code_name = getattr(data.code, "value", str(data.code))
    code = _CODES.get(code_name, auth_pb2.VERIFY_CODE_NOT_FOUND)
    meta: dict[str, Any] = data.meta or {}
    ratelimits = list(data.ratelimits or [])
    credits = data.credits
    if code == auth_pb2.VERIFY_CODE_RATE_LIMITED:
        resets = [_reset_seconds(rl.reset) for rl in ratelimits if rl.exceeded] or [1.0]
        return Verification(code, retry_after=min(resets))
    if code != auth_pb2.VERIFY_CODE_VALID or not data.valid:
        return Verification(code if code != auth_pb2.VERIFY_CODE_VALID else auth_pb2.VERIFY_CODE_NOT_FOUND)
    tenant = (data.identity.external_id if data.identity else "") or str(meta.get("tenant_id") or "")
    if not tenant:
        return Verification(
            auth_pb2.VERIFY_CODE_FORBIDDEN,
            detail="the Unkey key has no identity (externalId) or meta.tenant_id naming its tenant",
        )
    scopes = meta.get("scopes")
    scope_set = frozenset(str(s) for s in scopes) if isinstance(scopes, list) and scopes else frozenset(DEFAULT_SCOPES)
    limit = None
    if ratelimits and ratelimits[0].limit > 0 and ratelimits[0].duration > 0:
        limit = Limit(int(ratelimits[0].limit), ratelimits[0].duration / 1000)
    principal = Principal(
        key_id=data.key_id or "unkey",
        tenant_id=tenant,
        scopes=scope_set,
        rate_limit=limit,
        remaining_credits=-1 if credits is None else int(credits),
    )
    return Verification(code, principal, cacheable=credits is None)


def _reset_seconds(reset: int) -> float:
    # Unkey documents `reset` in milliseconds; accept both a duration and a unix-ms instant.
    if reset > 10**12:
        return max(0.0, reset / 1000 - time.time())
    return max(0.0, reset / 1000)


class UnkeyBackend:
    """KeyBackend over Unkey's verifyKey API."""

    def __init__(
        self,
        root_key: str,
        api_id: str,
        server_url: str = "",
        keyspace: str = "",
        plans: PlanSync | None = None,
    ) -> None:
        self.api_id = api_id
        self.plans = plans  # the identity's plan to billing_svc (unkey_plans.py); None: not carried
        self._keyspaces = [keyspace] if keyspace else None
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(3.0), follow_redirects=False)
        self._client = Unkey(root_key=root_key, server_url=server_url or None, async_client=self._http)

    async def verify(self, secret: str) -> Verification:
        """Ask Unkey about `secret`; UNAVAILABLE (raised) when Unkey cannot answer."""
        try:
            response = await self._client.keys.verify_key_async(key=secret, keyspaces=self._keyspaces, timeout_ms=3000)
        except Exception as err:  # any transport or HTTP error of the client: the backend is unusable
            _log.warning("unkey verify failed", extra={"error": type(err).__name__})
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the API key service is unreachable; retry shortly") from None
        verification = map_verify_data(response.data)
        if self.plans is not None and verification.principal is not None:
            plan, source = plan_claim(response.data)
            await self.plans.observe(verification.principal.tenant_id, plan, source)
        return verification

    async def close(self) -> None:
        """Close the HTTP client."""
        await self._http.aclose()
