"""The check every internal server makes: the shared internal token, and the tenant it vouches for.

instance_svc and billing_svc serve tenants only through the gateway, which sends the verified
tenant (`TENANT_METADATA`) beside the internal secret (`INTERNAL_TOKEN_METADATA`); internal
callers (instance_svc asking billing_svc) send the secret alone. The comparison is constant
time, and a missing or wrong token is UNAUTHENTICATED without saying what was expected.
"""

from __future__ import annotations

import hmac
from typing import Any

import grpc

from cyberdesk_common.metadata import INTERNAL_TOKEN_METADATA, TENANT_METADATA
from cyberdesk_common.status import RpcError, invalid_argument

Context = grpc.aio.ServicerContext[Any, Any]


class InternalAuth:
    """Checks a call's internal token (and reads the tenant the gateway vouches for)."""

    def __init__(self, internal_token: str) -> None:
        self._expected = internal_token.encode()

    def check(self, context: Context) -> dict[str, str]:
        """The call's metadata once its internal token is right; UNAUTHENTICATED otherwise."""
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        presented = metadata.get(INTERNAL_TOKEN_METADATA, "").encode()
        if not presented:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, f"missing {INTERNAL_TOKEN_METADATA} metadata")
        if not hmac.compare_digest(presented, self._expected):
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, f"{INTERNAL_TOKEN_METADATA} is not valid")
        return metadata

    def tenant(self, context: Context) -> str:
        """The tenant of a call from the gateway (INVALID_ARGUMENT when it names none)."""
        tenant = self.check(context).get(TENANT_METADATA, "")
        if not tenant:
            raise invalid_argument(f"missing {TENANT_METADATA} metadata (the caller's tenant)")
        return tenant
