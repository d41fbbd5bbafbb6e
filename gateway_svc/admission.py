"""One path for every public call, gRPC or REST: verify the key, spend the rate limit, pick the upstream.

`Admission.admit` is the only place where a caller becomes a `Target` (a channel plus the
metadata to send on it). The gRPC proxy (proxy.py) and the REST face (rest/upstream.py) both call
it, with the caller's credentials as metadata pairs (gRPC metadata or the HTTP headers of the same
names), so auth, scopes, rate limits, tenant scoping and routing cannot drift between the faces.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from cyberdesk_common.metadata import (
    AUTHORIZATION_METADATA,
    INTERNAL_METADATA_PREFIX,
    agent_metadata,
    internal_metadata,
)
from cyberdesk_common.status import RpcError, invalid_argument
from cyberdesk_common.tracing import inject_metadata
from gateway_svc.auth import SCOPE_INSTANCES, Principal
from gateway_svc.routing import AgentRoute
from gateway_svc.tenant_errors import tenant_message

_log = logging.getLogger("gateway_svc.admission")

INSTANCE_SERVICE = "cyberdesk.v1.InstanceService"
# Usage and plan of the caller's tenant: answered by billing_svc, admitted like InstanceService.
BILLING_SERVICE = "cyberdesk.v1.BillingService"
# Services whose calls go to the instance's agent; InstanceService goes to instance_svc.
AGENT_SERVICES = frozenset(
    {"cyberdesk.v1.ProcessService", "cyberdesk.v1.FilesystemService", "cyberdesk.v1.DesktopService"}
)

# Never forwarded upstream: credentials of the caller, headers only our services may set, trace
# headers (replaced), and transport headers gRPC sets itself.
_STRIP_EXACT = frozenset(
    {AUTHORIZATION_METADATA, "x-api-key", "traceparent", "tracestate", "user-agent", "content-type", "te"}
)
_STRIP_PREFIX = (INTERNAL_METADATA_PREFIX, "grpc-", ":")


def forwardable(metadata: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The caller's metadata that may travel upstream (credentials and internal headers stripped)."""
    return [(k, v) for k, v in metadata if k not in _STRIP_EXACT and not k.startswith(_STRIP_PREFIX)]


@dataclass(frozen=True)
class Target:
    """Where an admitted call goes: the channel, the metadata to send and the deadline."""

    channel: grpc.aio.Channel
    metadata: tuple[tuple[str, Any], ...]
    timeout: float | None
    instance_id: str = ""  # set for calls to an agent
    # What a tenant is told is unreachable when the call fails without an instance ("" above).
    upstream_name: str = "the instance service"


class CallGate(Protocol):
    """Key, scope and rate limit in two steps (`gateway_svc.gate.Gate`), so routing can overlap the Redis check."""

    async def begin(self, metadata: Sequence[tuple[str, str | bytes]], scope: str) -> tuple[Principal, Any]:
        """The verified principal and its begun rate-limit check; raises UNAUTHENTICATED or PERMISSION_DENIED."""
        ...

    async def finish(self, principal: Principal, pending: Any) -> None:
        """Raises RESOURCE_EXHAUSTED when the begun check refuses the call."""
        ...


class AgentRoutes(Protocol):
    """Instance -> agent route and channel (`gateway_svc.routing.RouteCache`)."""

    async def resolve(self, tenant_id: str, instance_id: str, deadline: float | None) -> AgentRoute:
        """The route to a RUNNING instance of `tenant_id`, or the precise RpcError."""
        ...

    def channel(self, route: AgentRoute) -> grpc.aio.Channel:
        """The (pooled) channel to `route`'s agent."""
        ...

    def invalidate(self, instance_id: str, close_channel: bool = False) -> None:
        """Forget the cached route of `instance_id`."""
        ...


@dataclass
class Admission:
    """Verify key -> check scope -> rate limit -> resolve the upstream (instance_svc or the instance's agent)."""

    gate: CallGate
    routes: AgentRoutes
    instance_channel: grpc.aio.Channel
    internal_token: str
    # billing_svc (BillingService); None: that service is not configured on this gateway.
    billing_channel: grpc.aio.Channel | None = None

    async def admit(
        self,
        service: str,
        metadata: Sequence[tuple[str, str | bytes]],
        instance_id: Callable[[], str],
        deadline: float | None,
        forward: Sequence[tuple[str, Any]] = (),
    ) -> Target:
        """The upstream of one call of `service` by the caller that sent `metadata`.

        `instance_id` is called only for agent services (after the key is verified, so an
        unauthenticated caller learns nothing about its request); it may raise INVALID_ARGUMENT.
        `deadline` is the caller's remaining time in seconds (None: none). `forward` is the caller's
        metadata that may travel upstream (see `forwardable`).
        Raises the precise RpcError: UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED,
        INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION or UNAVAILABLE.
        """
        principal, pending = await self.gate.begin(metadata, SCOPE_INSTANCES)
        # The rate-limit check is on its way to Redis; resolve the upstream meanwhile. Nothing is
        # forwarded before gate.finish allows the call, and a refusal wins over any routing error.
        try:
            target = await self._target(service, principal.tenant_id, instance_id, deadline, forward)
        except RpcError:
            await self.gate.finish(principal, pending)
            raise
        await self.gate.finish(principal, pending)
        return target

    async def _target(
        self,
        service: str,
        tenant_id: str,
        instance_id: Callable[[], str],
        deadline: float | None,
        forward: Sequence[tuple[str, Any]],
    ) -> Target:
        if service not in AGENT_SERVICES:
            # instance_svc and billing_svc believe the tenant only with the internal token beside it.
            upstream_md = [*forward, *internal_metadata(tenant_id, self.internal_token)]
            if service == BILLING_SERVICE:
                if self.billing_channel is None:
                    raise RpcError(grpc.StatusCode.UNIMPLEMENTED, "billing is not enabled on this gateway")
                return Target(
                    self.billing_channel, tuple(inject_metadata(upstream_md)), deadline, upstream_name="billing"
                )
            return Target(self.instance_channel, tuple(inject_metadata(upstream_md)), deadline)
        instance = instance_id()
        if not instance:
            raise invalid_argument("instance_id (field 1 of the first request message) is required")
        route = await self.routes.resolve(tenant_id, instance, deadline)
        agent_md = [*forward, *agent_metadata(route.token)]
        return Target(self.routes.channel(route), tuple(inject_metadata(agent_md)), deadline, instance)

    def upstream_failed(self, target: Target, code: grpc.StatusCode, details: str) -> tuple[grpc.StatusCode, str]:
        """The status a caller gets for an upstream failure; an unreachable agent's route is forgotten.

        The caller's message never names the agent's address or a token (`tenant_message`); the
        upstream's raw details go to this server's log when they were replaced.
        """
        if code is grpc.StatusCode.UNAVAILABLE and target.instance_id:
            # The agent went away: forget its route so the next call asks instance_svc again.
            self.routes.invalidate(target.instance_id)
        secrets = [self.internal_token, *(str(v) for k, v in target.metadata if k == AUTHORIZATION_METADATA)]
        secrets += [value.split(" ", 1)[-1] for value in secrets if " " in value]  # the token without "Bearer "
        message = tenant_message(target.instance_id, code, details, secrets, target.upstream_name)
        if message != details:
            logged = details
            for secret in secrets:
                logged = logged.replace(secret, "***") if secret else logged
            _log.warning(
                "upstream call failed",
                extra={"instance_id": target.instance_id or "-", "code": code.name, "upstream_details": logged},
            )
        return code, message
