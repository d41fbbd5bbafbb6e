"""The route cache (gateway_svc/routing.RouteCache) alone: a fake RoutingService, no sockets.

Agent channels are created (gRPC connects lazily, so no socket is opened) to check which ones a
lifecycle event closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import grpc
import pytest

from cyberdesk_common.lifecycle_events import InstanceState, LifecycleEvent
from cyberdesk_common.status import RpcError
from cyberdesk_proto.internal.v1 import routing_pb2
from cyberdesk_proto.v1 import instance_pb2
from gateway_svc.routing import AgentRoute, RouteCache, state_name

T = TypeVar("T")
RUNNING = instance_pb2.INSTANCE_STATE_RUNNING


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class FakeRouting:
    """Answers ResolveInstance from `answers` (instance -> response or status code); records every ask."""

    def __init__(self, answers: dict[str, routing_pb2.ResolveInstanceResponse | grpc.StatusCode]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str, tuple[tuple[str, str], ...]]] = []

    def ResolveInstance(
        self, request: routing_pb2.ResolveInstanceRequest, *, metadata: tuple[tuple[str, str], ...], timeout: float
    ) -> Awaitable[routing_pb2.ResolveInstanceResponse]:
        # Like a stub: the call is made now, its answer is awaited.
        self.asked.append((request.tenant_id, request.instance_id, metadata))
        return self._answer(request.instance_id)

    async def _answer(self, instance_id: str) -> routing_pb2.ResolveInstanceResponse:
        answer = self.answers[instance_id]
        if isinstance(answer, grpc.StatusCode):
            raise grpc.aio.AioRpcError(answer, grpc.aio.Metadata(), grpc.aio.Metadata(), "from instance_svc")
        return answer


def _running(target: str = "unix:///run/i-1/agent.sock") -> routing_pb2.ResolveInstanceResponse:
    return routing_pb2.ResolveInstanceResponse(state=RUNNING, agent_target=target, agent_token="tok")


def _event(instance_id: str, new_state: InstanceState) -> LifecycleEvent:
    return LifecycleEvent("e", "t", instance_id, InstanceState.RUNNING, new_state, 1, 1, 512, "base", "")


def test_running_answers_are_cached_per_tenant_with_the_internal_token() -> None:
    routing = FakeRouting({"i-1": _running()})

    async def scenario() -> list[AgentRoute]:
        cache = RouteCache(None, "secret", routing=routing)
        routes = [await cache.resolve("t", "i-1", 2.0), await cache.resolve("t", "i-1", 2.0)]
        # A hit for another tenant is never served from the cache: instance_svc is asked (and
        # would answer NOT_FOUND for a real instance of another tenant).
        routes.append(await cache.resolve("u", "i-1", None))
        return routes

    first, second, other = _run(scenario())
    assert first == second == AgentRoute("t", "i-1", "unix:///run/i-1/agent.sock", "tok")
    assert other.tenant_id == "u"
    assert routing.asked == [
        ("t", "i-1", (("x-cyberdesk-internal-token", "secret"),)),
        ("u", "i-1", (("x-cyberdesk-internal-token", "secret"),)),
    ]


def test_an_instance_not_running_or_without_an_agent_is_refused_and_not_cached() -> None:
    paused = routing_pb2.ResolveInstanceResponse(state=instance_pb2.INSTANCE_STATE_PAUSED, agent_target="x")
    no_agent = routing_pb2.ResolveInstanceResponse(state=RUNNING)
    routing = FakeRouting({"i-p": paused, "i-n": no_agent})

    async def scenario() -> list[RpcError]:
        cache = RouteCache(None, "secret", routing=routing)
        errors = []
        for instance in ("i-p", "i-p", "i-n"):
            with pytest.raises(RpcError) as err:
                await cache.resolve("t", instance, None)
            errors.append(err.value)
        return errors

    paused_err, _, no_agent_err = _run(scenario())
    assert paused_err.code is grpc.StatusCode.FAILED_PRECONDITION and "is PAUSED, not RUNNING" in paused_err.message
    assert no_agent_err.code is grpc.StatusCode.UNAVAILABLE
    assert len(routing.asked) == 3  # nothing was cached


def test_instance_svc_failures_become_precise_statuses() -> None:
    routing = FakeRouting({"i-down": grpc.StatusCode.DEADLINE_EXCEEDED, "i-gone": grpc.StatusCode.NOT_FOUND})

    async def scenario() -> list[RpcError]:
        cache = RouteCache(None, "secret", routing=routing)
        errors = []
        for instance in ("i-down", "i-gone"):
            with pytest.raises(RpcError) as err:
                await cache.resolve("t", instance, None)
            errors.append(err.value)
        return errors

    down, gone = _run(scenario())
    assert down.code is grpc.StatusCode.UNAVAILABLE and "unreachable" in down.message
    assert (gone.code, gone.message) == (grpc.StatusCode.NOT_FOUND, "from instance_svc")


def test_a_lifecycle_event_drops_the_route_and_a_terminal_one_closes_its_channel() -> None:
    routing = FakeRouting({"i-1": _running("unix:///run/i-1/a.sock"), "i-2": _running("unix:///run/i-2/a.sock")})

    async def scenario() -> tuple[bool, bool, list[str]]:
        cache = RouteCache(None, "secret", routing=routing)
        for instance in ("i-1", "i-2"):
            cache.channel(await cache.resolve("t", instance, None))
        cache.apply(_event("i-1", InstanceState.PAUSED))
        cache.apply(_event("i-2", InstanceState.TERMINATED))
        dropped = ("i-1" not in cache, "i-2" not in cache)
        await asyncio.sleep(0)  # the close of i-2's channel is scheduled on the loop
        targets = [key[0] for key in cache.pool._channels]
        await cache.pool.close()
        return dropped[0], dropped[1], targets

    paused_dropped, terminated_dropped, open_targets = _run(scenario())
    assert paused_dropped and terminated_dropped
    assert open_targets == ["unix:///run/i-1/a.sock"]  # PAUSED keeps the channel: it may resume


def test_routes_expire_after_the_ttl() -> None:
    routing = FakeRouting({"i-1": _running()})

    async def scenario() -> None:
        cache = RouteCache(None, "secret", ttl=0.05, routing=routing)
        await cache.resolve("t", "i-1", None)
        await asyncio.sleep(0.1)
        await cache.resolve("t", "i-1", None)

    _run(scenario())
    assert len(routing.asked) == 2


def test_state_names_are_the_enum_without_its_prefix() -> None:
    assert state_name(instance_pb2.INSTANCE_STATE_STOPPING) == "STOPPING"
    assert state_name(99) == "UNKNOWN(99)"


UNREACHABLE = "instance i-1 is not reachable (the connection to its agent was lost during the call)"


def test_a_lost_call_is_explained_by_the_state_the_events_announced() -> None:
    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        cache = RouteCache(None, "secret", routing=FakeRouting({"i-1": _running()}))
        await cache.resolve("t", "i-1", None)
        failed = LifecycleEvent("e", "t", "i-1", InstanceState.RUNNING, InstanceState.FAILED, 1, 1, 512, "base", "oom")
        cache.apply(failed)
        first = await cache.explain_lost("i-1", grpc.StatusCode.UNAVAILABLE, UNREACHABLE)
        ended = LifecycleEvent("f", "t", "i-1", InstanceState.STOPPING, InstanceState.TERMINATED, 2, 1, 512, "base", "")
        cache.apply(ended)
        return [first, await cache.explain_lost("i-1", grpc.StatusCode.CANCELLED, "Channel closed!")]

    assert _run(scenario()) == [
        (grpc.StatusCode.FAILED_PRECONDITION, "instance i-1 is FAILED: oom"),
        (grpc.StatusCode.FAILED_PRECONDITION, "instance i-1 was deleted"),
    ]


def test_a_lost_call_asks_instance_svc_when_no_event_told_and_waits_for_a_stopping_end() -> None:
    async def scenario() -> tuple[tuple[grpc.StatusCode, str], tuple[grpc.StatusCode, str], int]:
        routing = FakeRouting({"i-1": _running()})
        cache = RouteCache(None, "secret", routing=routing)
        await cache.resolve("t", "i-1", None)
        # The agent went away while instance_svc still says RUNNING: the agent itself is lost.
        still = await cache.explain_lost("i-1", grpc.StatusCode.UNAVAILABLE, UNREACHABLE)
        routing.answers["i-1"] = routing_pb2.ResolveInstanceResponse(state=instance_pb2.INSTANCE_STATE_STOPPING)
        expired = LifecycleEvent(
            "g",
            "t",
            "i-1",
            InstanceState.STOPPING,
            InstanceState.TERMINATED,
            3,
            1,
            512,
            "base",
            "expired at its deadline",
        )
        asyncio.get_running_loop().call_later(0.2, cache.apply, expired)
        ended = await cache.explain_lost("i-1", grpc.StatusCode.UNAVAILABLE, UNREACHABLE, settle=10)
        return still, ended, len(routing.asked)

    still, ended, asks = _run(scenario())
    assert still == (
        grpc.StatusCode.UNAVAILABLE,
        f"{UNREACHABLE}; instance_svc still reports it RUNNING, retry shortly",
    )
    assert ended == (grpc.StatusCode.FAILED_PRECONDITION, "instance i-1 was terminated: expired at its deadline")
    assert asks == 3  # the first resolve, then one fresh ResolveInstance per lost call


def test_a_lost_call_of_an_instance_never_routed_here_is_left_as_it_is() -> None:
    cache = RouteCache(None, "secret", routing=FakeRouting({}))
    assert _run(cache.explain_lost("i-9", grpc.StatusCode.UNAVAILABLE, UNREACHABLE)) == (
        grpc.StatusCode.UNAVAILABLE,
        UNREACHABLE,
    )
