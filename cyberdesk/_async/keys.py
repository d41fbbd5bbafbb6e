"""`client.keys`: API-key management; needs a key with the admin scope."""

from __future__ import annotations

from cyberdesk._async._transport import AsyncTransport
from cyberdesk._models import ApiKey
from cyberdesk_proto.internal.v1 import auth_pb2


class AsyncKeys:
    """`client.keys`: API-key management; needs a key with the admin scope."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def create(self, tenant: str, name: str, *, admin: bool = False) -> tuple[ApiKey, str]:
        """Create a key; returns its record and its secret (shown this once only)."""
        scopes = ["instances", "admin"] if admin else ["instances"]
        request = auth_pb2.CreateKeyRequest(tenant_id=tenant, name=name, scopes=scopes)
        reply = await self._t.unary(self._t.auth.CreateKey, request)
        return ApiKey.from_proto(reply.api_key), reply.secret

    async def list(self, tenant: str) -> list[ApiKey]:
        """A tenant's keys, newest first (without secrets)."""
        result: list[ApiKey] = []
        token = ""
        while True:
            request = auth_pb2.ListKeysRequest(tenant_id=tenant, page_size=200, page_token=token)
            reply = await self._t.unary(self._t.auth.ListKeys, request)
            result.extend(ApiKey.from_proto(k) for k in reply.api_keys)
            token = reply.next_page_token
            if not token:
                return result

    async def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key; gateways refuse it within seconds."""
        reply = await self._t.unary(self._t.auth.RevokeKey, auth_pb2.RevokeKeyRequest(key_id=key_id))
        return ApiKey.from_proto(reply.api_key)
