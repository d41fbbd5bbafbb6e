"""The admission check every public call passes: API key, scope, then the key's rate limit.

Protocol-neutral (metadata pairs in, Principal or RpcError out) so that the REST face can call it
with HTTP headers mapped to the same names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cyberdesk_common.status import RpcError, resource_exhausted
from gateway_svc.auth import Authenticator, Principal, require_scope
from gateway_svc.ratelimit import Limit, PendingCheck, RateLimiter

RETRY_AFTER = "retry-after"


class RateLimited(RpcError):
    """RESOURCE_EXHAUSTED with RetryInfo in the status details and a `retry-after` trailer (whole seconds)."""

    def __init__(self, key_id: str, limit: Limit, retry_after: float) -> None:
        base = resource_exhausted(
            f"rate limit of API key {key_id} reached ({limit}); retry in {retry_after:.3f} s", retry_after
        )
        super().__init__(base.code, base.message, base.details)
        self.retry_after = retry_after

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """The RetryInfo trailer plus `retry-after`, like HTTP's header, rounded up to whole seconds."""
        return (*super().trailing_metadata(), (RETRY_AFTER, str(max(1, math.ceil(self.retry_after))).encode()))


@dataclass
class Gate:
    """Authenticate, check the scope, spend one request of the key's budget."""

    authenticator: Authenticator
    limiter: RateLimiter
    default_limit: Limit

    async def admit(self, metadata: Sequence[tuple[str, str | bytes]], scope: str) -> Principal:
        """The caller's principal when the call may proceed; raises the precise RpcError otherwise."""
        principal, pending = await self.begin(metadata, scope)
        await self.finish(principal, pending)
        return principal

    async def begin(self, metadata: Sequence[tuple[str, str | bytes]], scope: str) -> tuple[Principal, PendingCheck]:
        """Authenticate and check the scope, and send the rate-limit check; `finish` must follow before forwarding."""
        principal = await self.authenticator.authenticate(metadata)
        require_scope(principal, scope)
        return principal, self.limiter.begin(principal.key_id, principal.rate_limit or self.default_limit)

    async def finish(self, principal: Principal, pending: PendingCheck) -> None:
        """RESOURCE_EXHAUSTED (with RetryInfo) when the begun rate-limit check refuses the call."""
        decision = await self.limiter.finish(pending)
        if not decision.allowed:
            limit = principal.rate_limit or self.default_limit
            raise RateLimited(principal.key_id, limit, decision.retry_after)
