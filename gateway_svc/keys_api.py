"""cyberdesk.internal.v1.AuthService on the gateway port: API-key management for operators.

Every method demands a key with the `admin` scope (an operator key; the first one is made with
`python -m gateway_svc keys create --admin`). VerifyKey is admin-only too: callers of the public
API never need it, and it must not become an oracle for probing keys.

The methods take the caller's metadata rather than a gRPC context, so that the REST face
(`/v1/keys`, gateway_svc/rest/app.py) calls the very same code with the HTTP credential headers:
one admission check, one set of refusals, whichever face the operator uses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from cyberdesk_common.status import RpcError, invalid_argument, not_found
from cyberdesk_proto.internal.v1 import auth_pb2, auth_pb2_grpc
from gateway_svc.auth import SCOPE_ADMIN, SCOPE_INSTANCES
from gateway_svc.gate import Gate
from gateway_svc.keystore import KeyStore
from gateway_svc.ratelimit import Limit

AUTH_SERVICE = "cyberdesk.internal.v1.AuthService"
KNOWN_SCOPES = frozenset({SCOPE_INSTANCES, SCOPE_ADMIN})
_MAX_PAGE = 1000


def check_create(request: auth_pb2.CreateKeyRequest) -> Limit | None:
    """Validate a CreateKeyRequest; returns its rate limit (None: the default)."""
    if not request.tenant_id or len(request.tenant_id) > 128:
        raise invalid_argument("tenant_id is required (1-128 characters)")
    if not request.name or len(request.name) > 200:
        raise invalid_argument("name is required (1-200 characters)")
    unknown = set(request.scopes) - KNOWN_SCOPES
    if unknown:
        raise invalid_argument(f"unknown scopes {sorted(unknown)}; known: {sorted(KNOWN_SCOPES)}")
    if request.rate_limit.limit < 0:
        raise invalid_argument("rate_limit.limit must not be negative")
    if request.rate_limit.limit == 0:
        return None
    window = request.rate_limit.window.ToMilliseconds() / 1000
    if window <= 0:
        raise invalid_argument("rate_limit.window must be positive when rate_limit.limit is set")
    return Limit(request.rate_limit.limit, window)


Metadata = Sequence[tuple[str, str | bytes]]


def _metadata(context: grpc.aio.ServicerContext) -> Metadata:  # type: ignore[type-arg]
    return tuple(context.invocation_metadata() or ())


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """Create, list, revoke and verify keys of the local key store (admin keys only)."""

    def __init__(self, gate: Gate, store: KeyStore | None) -> None:
        self._gate = gate
        self._store = store

    async def call(self, method: str, request: Message, metadata: Metadata) -> Message:
        """Call one method by its short name with the caller's metadata (the REST face's entry)."""
        handlers: dict[str, Callable[[Any, Metadata], Awaitable[Message]]] = {
            "CreateKey": self.create_key,
            "ListKeys": self.list_keys,
            "RevokeKey": self.revoke_key,
            "VerifyKey": self.verify_key,
        }
        handler = handlers.get(method)
        if handler is None:
            raise RpcError(grpc.StatusCode.UNIMPLEMENTED, f"{AUTH_SERVICE}.{method} is not served here")
        return await handler(request, metadata)

    async def _admin(self, metadata: Metadata) -> KeyStore:
        await self._gate.admit(metadata, SCOPE_ADMIN)
        if self._store is None:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "API keys are managed in Unkey (CYBERDESK_UNKEY_* is set); use Unkey's dashboard or API",
            )
        return self._store

    async def CreateKey(
        self,
        request: auth_pb2.CreateKeyRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> auth_pb2.CreateKeyResponse:
        """Create a key for a tenant; the secret is in this response only."""
        return await self.create_key(request, _metadata(context))

    async def create_key(self, request: auth_pb2.CreateKeyRequest, metadata: Metadata) -> auth_pb2.CreateKeyResponse:
        """Create a key for a tenant; the secret is in this response only."""
        store = await self._admin(metadata)
        limit = check_create(request)
        key, secret = store.create(request.tenant_id, request.name, list(request.scopes), limit)
        return auth_pb2.CreateKeyResponse(api_key=key, secret=secret)

    async def ListKeys(
        self,
        request: auth_pb2.ListKeysRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> auth_pb2.ListKeysResponse:
        """A page of a tenant's keys, newest first, without secrets."""
        return await self.list_keys(request, _metadata(context))

    async def list_keys(self, request: auth_pb2.ListKeysRequest, metadata: Metadata) -> auth_pb2.ListKeysResponse:
        """A page of a tenant's keys, newest first, without secrets."""
        store = await self._admin(metadata)
        if not request.tenant_id:
            raise invalid_argument("tenant_id is required")
        if request.page_size < 0 or request.page_size > _MAX_PAGE:
            raise invalid_argument(f"page_size must be between 0 and {_MAX_PAGE}")
        after: int | None = None
        if request.page_token:
            try:
                after = int(request.page_token)
            except ValueError:
                raise invalid_argument("page_token is not a token returned by ListKeys") from None
        keys, next_after = store.list(request.tenant_id, request.page_size or 50, after)
        return auth_pb2.ListKeysResponse(api_keys=keys, next_page_token="" if next_after is None else str(next_after))

    async def RevokeKey(
        self,
        request: auth_pb2.RevokeKeyRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> auth_pb2.RevokeKeyResponse:
        """Revoke a key; gateways stop accepting it within their cache bound (CYBERDESK_AUTH_CACHE_SECONDS)."""
        return await self.revoke_key(request, _metadata(context))

    async def revoke_key(self, request: auth_pb2.RevokeKeyRequest, metadata: Metadata) -> auth_pb2.RevokeKeyResponse:
        """Revoke a key; gateways stop accepting it within their cache bound (CYBERDESK_AUTH_CACHE_SECONDS)."""
        store = await self._admin(metadata)
        if not request.key_id:
            raise invalid_argument("key_id is required")
        key = store.revoke(request.key_id)
        if key is None:
            raise not_found(f"API key {request.key_id} does not exist")
        return auth_pb2.RevokeKeyResponse(api_key=key)

    async def VerifyKey(
        self,
        request: auth_pb2.VerifyKeyRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> auth_pb2.VerifyKeyResponse:
        """Verify a presented secret (bypassing the cache) and describe its key."""
        return await self.verify_key(request, _metadata(context))

    async def verify_key(self, request: auth_pb2.VerifyKeyRequest, metadata: Metadata) -> auth_pb2.VerifyKeyResponse:
        """Verify a presented secret (bypassing the cache) and describe its key."""
        store = await self._admin(metadata)
        if not request.key:
            raise invalid_argument("key is required")
        verification = store.lookup(request.key)
        reply = auth_pb2.VerifyKeyResponse(code=verification.code, remaining_credits=-1)  # type: ignore[arg-type]
        if verification.principal is not None:
            key = store.get(verification.principal.key_id)
            if key is not None:
                reply.api_key.CopyFrom(key)
        return reply
