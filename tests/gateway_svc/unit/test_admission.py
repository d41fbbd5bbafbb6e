"""Admission alone (gateway_svc/admission.py), in-process and without sockets.

The gate (key, scope, rate limit) and the route cache are small fakes that record what they were
asked; the channels are plain marker objects (Admission only hands them on in the Target).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar, cast

import grpc
import pytest

from cyberdesk_common.status import RpcError, not_found
from gateway_svc.admission import AGENT_SERVICES, BILLING_SERVICE, INSTANCE_SERVICE, Admission, Target, forwardable
from gateway_svc.auth import Principal
from gateway_svc.gate import RateLimited
from gateway_svc.ratelimit import Limit
from gateway_svc.routing import AgentRoute

T = TypeVar("T")
PROCESSES = "cyberdesk.v1.ProcessService"
INSTANCE_CHANNEL = cast(grpc.aio.Channel, object())
AGENT_CHANNEL = cast(grpc.aio.Channel, object())
BILLING_CHANNEL = cast(grpc.aio.Channel, object())


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class FakeGate:
    """Accepts the key "good" for tenant-a; refuses others. `limited` makes the rate limit refuse."""

    def __init__(self, limited: bool = False) -> None:
        self.limited = limited
        self.log: list[str] = []

    async def begin(self, metadata: Sequence[tuple[str, str | bytes]], scope: str) -> tuple[Principal, Any]:
        self.log.append(f"begin {scope}")
        if ("authorization", "Bearer good") not in metadata:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "bad key")
        return Principal("key-1", "tenant-a", frozenset({"instances"})), "pending-check"

    async def finish(self, principal: Principal, pending: Any) -> None:
        self.log.append(f"finish {pending}")
        if self.limited:
            raise RateLimited(principal.key_id, Limit(1, 1.0), 0.5)


class FakeRoutes:
    """Routes i-1 of tenant-a to an agent; any other instance is NOT_FOUND."""

    def __init__(self) -> None:
        self.resolved: list[tuple[str, str, float | None]] = []
        self.invalidated: list[str] = []

    async def resolve(self, tenant_id: str, instance_id: str, deadline: float | None) -> AgentRoute:
        self.resolved.append((tenant_id, instance_id, deadline))
        if (tenant_id, instance_id) != ("tenant-a", "i-1"):
            raise not_found(f"instance {instance_id} not found")
        return AgentRoute(tenant_id, instance_id, "unix:///run/i-1/agent.sock", "agent-token")

    def channel(self, route: AgentRoute) -> grpc.aio.Channel:
        assert route.instance_id == "i-1"
        return AGENT_CHANNEL

    def invalidate(self, instance_id: str, close_channel: bool = False) -> None:
        self.invalidated.append(instance_id)


def _admission(gate: FakeGate | None = None, routes: FakeRoutes | None = None) -> Admission:
    return Admission(gate or FakeGate(), routes or FakeRoutes(), INSTANCE_CHANNEL, "internal-secret")


GOOD = (("authorization", "Bearer good"), ("x-request-id", "r1"))


def test_forwardable_strips_credentials_and_claims() -> None:
    incoming = [
        ("authorization", "Bearer cd_x"),
        ("x-api-key", "cd_x"),
        ("x-cyberdesk-tenant", "someone-else"),
        ("x-cyberdesk-internal-token", "guess"),
        ("traceparent", "00-x"),
        ("user-agent", "grpc-python"),
        ("x-request-id", "r1"),
    ]
    assert forwardable(incoming) == [("x-request-id", "r1")]


def test_instance_service_calls_go_to_instance_svc_with_the_verified_tenant() -> None:
    routes = FakeRoutes()
    target = _run(_admission(routes=routes).admit(INSTANCE_SERVICE, GOOD, lambda: "unused", 7.5, forwardable(GOOD)))
    assert target == Target(
        INSTANCE_CHANNEL,
        (("x-request-id", "r1"), ("x-cyberdesk-tenant", "tenant-a"), ("x-cyberdesk-internal-token", "internal-secret")),
        7.5,
    )
    assert routes.resolved == []


def test_billing_calls_go_to_billing_svc_with_the_verified_tenant_or_are_unimplemented_without_it() -> None:
    admission = Admission(
        FakeGate(), FakeRoutes(), INSTANCE_CHANNEL, "internal-secret", billing_channel=BILLING_CHANNEL
    )
    target = _run(admission.admit(BILLING_SERVICE, GOOD, lambda: "unused", 2.0, forwardable(GOOD)))
    assert target.channel is BILLING_CHANNEL and target.upstream_name == "billing"
    assert ("x-cyberdesk-tenant", "tenant-a") in target.metadata
    assert ("x-cyberdesk-internal-token", "internal-secret") in target.metadata
    # An unreachable billing_svc is named as such to the tenant, without its address.
    code, message = admission.upstream_failed(
        target, grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: ipv4:10.0.0.9:50071"
    )
    assert (code, message) == (grpc.StatusCode.UNAVAILABLE, "billing is unreachable; retry shortly")
    with pytest.raises(RpcError) as err:
        _run(_admission().admit(BILLING_SERVICE, GOOD, lambda: "unused", 2.0, forwardable(GOOD)))
    assert err.value.code is grpc.StatusCode.UNIMPLEMENTED


def test_agent_calls_go_to_the_instances_agent_with_its_token_only() -> None:
    routes = FakeRoutes()
    target = _run(_admission(routes=routes).admit(PROCESSES, GOOD, lambda: "i-1", 3.0, forwardable(GOOD)))
    agent_md = (("x-request-id", "r1"), ("authorization", "Bearer agent-token"))
    assert target == Target(AGENT_CHANNEL, agent_md, 3.0, "i-1")
    assert routes.resolved == [("tenant-a", "i-1", 3.0)]
    assert {PROCESSES, "cyberdesk.v1.FilesystemService", "cyberdesk.v1.DesktopService"} == AGENT_SERVICES


def test_an_unauthenticated_caller_learns_nothing_about_its_request() -> None:
    read: list[str] = []

    def instance_id() -> str:
        read.append("read")
        return "i-1"

    routes = FakeRoutes()
    with pytest.raises(RpcError) as err:
        _run(_admission(routes=routes).admit(PROCESSES, [("authorization", "Bearer bad")], instance_id, None))
    assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert read == [] and routes.resolved == []


def test_missing_instance_id_is_invalid_and_the_rate_limit_is_still_decided() -> None:
    gate = FakeGate()
    with pytest.raises(RpcError) as err:
        _run(_admission(gate).admit(PROCESSES, GOOD, lambda: "", None))
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert gate.log == ["begin instances", "finish pending-check"]


def test_a_refused_rate_limit_wins_over_a_routing_error() -> None:
    with pytest.raises(RpcError) as err:
        _run(_admission(FakeGate(limited=True)).admit(PROCESSES, GOOD, lambda: "i-other", None))
    assert err.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_refused_rate_limit_gives_no_target_even_when_the_route_resolves() -> None:
    routes = FakeRoutes()
    with pytest.raises(RpcError) as err:
        _run(_admission(FakeGate(limited=True), routes).admit(PROCESSES, GOOD, lambda: "i-1", None))
    assert err.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert routes.resolved == [("tenant-a", "i-1", None)]  # resolved meanwhile, never handed out


def test_routing_errors_reach_the_caller_unchanged() -> None:
    with pytest.raises(RpcError) as err:
        _run(_admission().admit(PROCESSES, GOOD, lambda: "i-other", None))
    assert err.value.code is grpc.StatusCode.NOT_FOUND and "i-other" in err.value.message


def test_an_unreachable_agent_forgets_its_route_and_says_which_instance() -> None:
    routes = FakeRoutes()
    admission = _admission(routes=routes)
    agent = Target(AGENT_CHANNEL, (), None, "i-1")
    code, details = admission.upstream_failed(agent, grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert code is grpc.StatusCode.UNAVAILABLE
    assert details == "instance i-1 is not reachable (its agent does not answer)"
    assert routes.invalidated == ["i-1"]
    # Other failures of an agent, and any failure of instance_svc, keep the route and the details.
    assert admission.upstream_failed(agent, grpc.StatusCode.NOT_FOUND, "no such process") == (
        grpc.StatusCode.NOT_FOUND,
        "no such process",
    )
    instance_svc = Target(INSTANCE_CHANNEL, (), None)
    assert admission.upstream_failed(instance_svc, grpc.StatusCode.UNAVAILABLE, "down") == (
        grpc.StatusCode.UNAVAILABLE,
        "down",
    )
    assert routes.invalidated == ["i-1"]
