"""Routing: which upstream serves a call, and the pooled channels to reach it.

- `read_instance_id` reads field 1 (`instance_id`) of a serialized request without decoding the
  rest: every request of the public services carries the instance there (see
  docs/architecture.md), so the gateway can forward request bytes unchanged.
- `RouteCache` resolves (tenant, instance) to an `AgentRoute` (the instance's agent endpoint and
  token) through instance_svc's RoutingService, caches RUNNING answers for a few seconds
  (bounded), and drops entries when instance_svc announces a lifecycle change: `follow_events`
  reads the stream with the shared tail reader (`cyberdesk_common.lifecycle_events`).
- `ChannelPool` keeps one channel per agent; gRPC multiplexes every call to that agent over it.
- `RouteCache.explain_lost` turns a call lost mid-way into what happened to the instance (deleted,
  failed, paused) from the states the lifecycle events announced and, failing that, a fresh
  ResolveInstance (see `tenant_errors.lost_call_status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from redis.exceptions import RedisError

from cyberdesk_common import lifecycle_events
from cyberdesk_common.agent_channel import open_agent_channel
from cyberdesk_common.lifecycle_events import EventStreamUnavailable, InstanceState, LifecycleEvent
from cyberdesk_common.metadata import INTERNAL_TOKEN_METADATA
from cyberdesk_common.status import RpcError, failed_precondition
from cyberdesk_proto.internal.v1 import routing_pb2, routing_pb2_grpc
from cyberdesk_proto.v1 import instance_pb2
from gateway_svc.tenant_errors import lost_call_status, tenant_message

_log = logging.getLogger("gateway_svc.routing")

# How long a call lost under a STOPPING instance waits for the event saying how it ended.
LOST_SETTLE_SECONDS = 3.0


class WireError(ValueError):
    """The request bytes are not a well-formed protobuf message."""


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise WireError("varint longer than 10 bytes")


def top_level_fields(data: bytes) -> Iterator[tuple[int, memoryview | None]]:
    """(field number, payload if length-delimited, else None) of each top-level field of `data`.

    Only tags are parsed; other payloads are skipped by their length without being decoded, so a
    message carrying a 16 MiB chunk costs a few comparisons. WireError on malformed bytes.
    """
    view = memoryview(data)
    pos = 0
    end = len(view)
    while pos < end:
        key, pos = _varint(view, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        payload = None
        if wire == 0:
            _, pos = _varint(view, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(view, pos)
            if pos + length > end:
                raise WireError("length-delimited field runs past the end")
            payload = view[pos : pos + length]
            pos += length
        else:
            raise WireError(f"unsupported wire type {wire}")
        if pos > end:
            raise WireError("field runs past the end")
        yield field, payload


def read_instance_id(data: bytes) -> str:
    """The string in field 1 of the serialized message `data` ("" when absent).

    Protobuf's rule for a repeated singular field is "last one wins", so the whole message is
    scanned and the last field 1 is returned, exactly what the agent will see when it decodes the
    same bytes.
    """
    found = ""
    for field, payload in top_level_fields(data):
        if field != 1:
            continue
        if payload is None:
            raise WireError("field 1 (instance_id) is not a string")
        try:
            found = bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("instance_id is not valid UTF-8") from None
    return found


def state_name(state: int) -> str:
    """ "RUNNING" for INSTANCE_STATE_RUNNING, and so on."""
    try:
        return InstanceState(state).name
    except ValueError:
        return f"UNKNOWN({state})"


@dataclass(frozen=True)
class AgentRoute:
    """Where an instance's agent listens and how to talk to it (an answer of ResolveInstance)."""

    tenant_id: str
    instance_id: str
    target: str
    token: str
    ca_pem: str = ""
    server_name: str = ""


class ChannelPool:
    """One grpc.aio channel per agent (target, CA, server name), least recently used closed first."""

    def __init__(self, max_channels: int = 4096) -> None:
        self._channels: OrderedDict[tuple[str, str, str], grpc.aio.Channel] = OrderedDict()
        self._max = max_channels

    def get(self, route: AgentRoute) -> grpc.aio.Channel:
        """The channel to `route`'s agent, created on first use."""
        key = (route.target, route.ca_pem, route.server_name)
        channel = self._channels.get(key)
        if channel is not None:
            self._channels.move_to_end(key)
            return channel
        channel = open_agent_channel(route)
        self._channels[key] = channel
        while len(self._channels) > self._max:
            _, old = self._channels.popitem(last=False)
            asyncio.get_running_loop().create_task(old.close(grace=30))
        return channel

    def drop(self, target: str) -> None:
        """Close the channels to `target` (its instance is gone); in-flight calls get 5 s to finish."""
        for key in [k for k in self._channels if k[0] == target]:
            asyncio.get_running_loop().create_task(self._channels.pop(key).close(grace=5))

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), OrderedDict()
        for channel in channels:
            await channel.close(grace=None)


class RoutingClient(Protocol):
    """The one call the cache makes to instance_svc (`cyberdesk.internal.v1.RoutingService`)."""

    def ResolveInstance(
        self, request: routing_pb2.ResolveInstanceRequest, *, metadata: tuple[tuple[str, str], ...], timeout: float
    ) -> Awaitable[routing_pb2.ResolveInstanceResponse]:
        """The instance's state and agent endpoint, for its tenant."""
        ...


class RouteCache:
    """Resolves (tenant, instance) to an AgentRoute through instance_svc, with a short, bounded cache."""

    def __init__(
        self,
        instance_channel: grpc.aio.Channel | None,
        internal_token: str,
        ttl: float = 5.0,
        max_entries: int = 10_000,
        *,
        routing: RoutingClient | None = None,
    ) -> None:
        # `routing` replaces the RoutingService stub on `instance_channel` (unit tests pass a fake).
        if routing is None:
            assert instance_channel is not None, "RouteCache needs the instance_svc channel or a routing client"
            routing = routing_pb2_grpc.RoutingServiceStub(instance_channel)
        self._stub: RoutingClient = routing
        self._metadata = ((INTERNAL_TOKEN_METADATA, internal_token),)
        self.ttl = ttl
        self._max = max_entries
        # instance_id -> (expires, route). Only RUNNING answers are cached; the tenant is kept in
        # the route and compared on every hit, so a cached route never serves another tenant.
        self._cache: OrderedDict[str, tuple[float, AgentRoute]] = OrderedDict()
        # Kept past invalidation, for explaining a lost call: instance -> the tenant a route was
        # resolved for (an admitted caller of that tenant), and the last state an event announced.
        self._tenants: OrderedDict[str, str] = OrderedDict()
        self._states: OrderedDict[str, tuple[InstanceState, str]] = OrderedDict()
        self.pool = ChannelPool()

    async def resolve(self, tenant_id: str, instance_id: str, deadline: float | None) -> AgentRoute:
        """The route to a RUNNING instance of `tenant_id`, or NOT_FOUND / FAILED_PRECONDITION / UNAVAILABLE."""
        hit = self._cache.get(instance_id)
        if hit is not None:
            expires, route = hit
            if expires > time.monotonic() and route.tenant_id == tenant_id:
                self._cache.move_to_end(instance_id)
                return route
        try:
            reply: routing_pb2.ResolveInstanceResponse = await self._stub.ResolveInstance(
                routing_pb2.ResolveInstanceRequest(tenant_id=tenant_id, instance_id=instance_id),
                metadata=self._metadata,
                timeout=min(deadline, 5.0) if deadline is not None else 5.0,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise RpcError(
                    grpc.StatusCode.UNAVAILABLE, "the instance service is unreachable; retry shortly"
                ) from None
            # instance_svc's own answers (NOT_FOUND naming the instance) pass; an address does not.
            raise RpcError(err.code(), tenant_message("", err.code(), err.details() or "")) from None
        if reply.state != instance_pb2.INSTANCE_STATE_RUNNING:
            raise failed_precondition(
                f"instance {instance_id} is {state_name(reply.state)}, not RUNNING; "
                "processes, files and the desktop are only reachable while it runs"
            )
        if not reply.agent_target:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"instance {instance_id} has no agent endpoint yet; retry")
        route = AgentRoute(
            tenant_id, instance_id, reply.agent_target, reply.agent_token, reply.agent_ca_pem, reply.agent_server_name
        )
        if self.ttl > 0:
            self._cache[instance_id] = (time.monotonic() + self.ttl, route)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        _remember(self._tenants, instance_id, tenant_id, self._max)
        return route

    async def explain_lost(
        self, instance_id: str, code: grpc.StatusCode, message: str, *, settle: float = LOST_SETTLE_SECONDS
    ) -> tuple[grpc.StatusCode, str]:
        """The status for a call to `instance_id`'s agent that failed with `code` (UNAVAILABLE, CANCELLED).

        A delete records STOPPING before it kills the sandbox, so when the agent's connection
        drops, instance_svc already knows; the event saying so may still be on its way, hence a
        fresh ResolveInstance when the events have not told. A STOPPING instance is given up to
        `settle` seconds to announce how it ended ("deleted" or "expired at its deadline").
        Unknown (no tenant on record, instance_svc unreachable): `code` and `message` unchanged.
        """
        known = self._states.get(instance_id)
        state = known[0] if known else None
        if state is None or state is InstanceState.RUNNING:
            tenant = self._tenants.get(instance_id)
            if tenant is None:
                return code, message
            try:
                reply = await self._stub.ResolveInstance(
                    routing_pb2.ResolveInstanceRequest(tenant_id=tenant, instance_id=instance_id),
                    metadata=self._metadata,
                    timeout=2.0,
                )
            except grpc.aio.AioRpcError as err:
                if err.code() is grpc.StatusCode.NOT_FOUND:
                    return grpc.StatusCode.NOT_FOUND, f"instance {instance_id} no longer exists"
                return code, message
            try:
                state = InstanceState(reply.state)
            except ValueError:
                return code, message
        deadline = time.monotonic() + settle
        while state is InstanceState.STOPPING and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            known = self._states.get(instance_id)
            if known is not None and known[0] is not InstanceState.STOPPING:
                state = known[0]
        known = self._states.get(instance_id)
        why = known[1] if known is not None and known[0] is state else ""
        return lost_call_status(instance_id, state, why, code, message)

    def channel(self, route: AgentRoute) -> grpc.aio.Channel:
        """The pooled channel to `route`'s agent."""
        return self.pool.get(route)

    def invalidate(self, instance_id: str, close_channel: bool = False) -> None:
        """Forget the cached route of `instance_id` (and close its channel when the instance is gone)."""
        hit = self._cache.pop(instance_id, None)
        if hit is not None and close_channel:
            self.pool.drop(hit[1].target)

    def apply(self, event: LifecycleEvent) -> None:
        """A lifecycle change of an instance: forget its route; close its channel once it is gone."""
        _remember(self._states, event.instance_id, (event.new_state, event.state_message), self._max)
        self.invalidate(event.instance_id, close_channel=event.new_state.terminal)

    def clear(self) -> None:
        """Forget every cached route (after missing events)."""
        self._cache.clear()

    def __contains__(self, instance_id: str) -> bool:
        return instance_id in self._cache


def _remember(table: OrderedDict[str, Any], key: str, value: Any, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


class FollowsEvents(Protocol):
    """What `follow_events` drives: the route cache (or, in a test, a recorder of what it was told)."""

    def apply(self, event: LifecycleEvent) -> None:
        """One lifecycle event, in stream order."""

    def clear(self) -> None:
        """Events may have been missed (Redis unreachable): forget everything they would have changed."""


async def follow_events(
    routes: FollowsEvents,
    redis_url: str,
    stop: asyncio.Event,
    *,
    block_ms: int = lifecycle_events.BLOCK_MS,
    max_backoff: float = 5.0,
) -> None:
    """Apply every lifecycle event to `routes` until `stop` is set.

    Starts from the stream's end (older events cannot concern routes cached by this process),
    then reads from the last id seen, so no event written between two reads is lost. When Redis
    drops, every route is forgotten (events may be missed) at each failed attempt, and the reader
    reconnects with back-off (0.2 s doubling to `max_backoff`), resuming after the last id seen.
    """
    follower = asyncio.create_task(_follow(routes, redis_url, block_ms, max_backoff), name="follow-events")
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({follower, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        follower.cancel()
        stopped.cancel()
        await asyncio.gather(follower, stopped, return_exceptions=True)
    if not follower.cancelled() and (failure := follower.exception()) is not None:
        raise failure


async def _follow(routes: FollowsEvents, redis_url: str, block_ms: int, max_backoff: float) -> None:
    client = lifecycle_events.connect(redis_url)
    last_id: str | None = None  # None: from the stream's end
    down = False
    delay = 0.2
    try:
        while True:
            try:
                if down:
                    # Reachable again? Forget the routes cached while events could not be read,
                    # then resume after the last id seen.
                    await client.ping()
                    _log.info("following lifecycle events again")
                    routes.clear()
                    down, delay = False, 0.2
                async with contextlib.aclosing(
                    lifecycle_events.tail(client, after=last_id, block_ms=block_ms)
                ) as events:
                    async for entry_id, event in events:
                        last_id = entry_id
                        routes.apply(event)
            except (EventStreamUnavailable, RedisError, OSError) as err:
                if not down:
                    _log.warning("not following lifecycle events: redis unreachable", extra={"error": str(err)})
                down = True
                routes.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_backoff)
    finally:
        await client.aclose()


async def explain_lost(
    routes: object, instance_id: str, code: grpc.StatusCode, message: str
) -> tuple[grpc.StatusCode, str]:
    """`RouteCache.explain_lost` for whatever routes the admission holds (a test's fake: unchanged)."""
    if isinstance(routes, RouteCache) and instance_id:
        return await routes.explain_lost(instance_id, code, message)
    return code, message
