"""Routing: which upstream serves a call, and the pooled channels to reach it.

- `read_instance_id` reads field 1 (`instance_id`) of a serialized request without decoding the
  rest: every request of the public services carries the instance there (see
  docs/architecture.md), so the gateway can forward request bytes unchanged.
- `Router` resolves (tenant, instance) to the instance's agent through instance_svc's
  RoutingService, caches RUNNING answers for a few seconds (bounded), and drops entries when
  instance_svc announces a lifecycle change on the Redis stream `cyberdesk:events`.
- `ChannelPool` keeps one channel per agent; gRPC multiplexes every call to that agent over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from cyberdesk_common.status import RpcError, failed_precondition
from cyberdesk_proto.internal.v1 import routing_pb2, routing_pb2_grpc
from cyberdesk_proto.v1 import instance_pb2

_log = logging.getLogger("gateway_svc.routing")

EVENTS_STREAM = "cyberdesk:events"
INTERNAL_TOKEN_HEADER = "x-cyberdesk-internal-token"
TENANT_HEADER = "x-cyberdesk-tenant"

# Same limits as our servers (cyberdesk_common.grpc_server.DEFAULT_OPTIONS): a 16 MiB message
# from an agent must pass through the gateway unchanged.
CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # An agent that went away must fail the next call quickly, not after the default 1-120 s
    # reconnect backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)


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


def read_instance_id(data: bytes) -> str:
    """The string in field 1 of the serialized message `data` ("" when absent).

    Only tags are parsed; other fields are skipped by their length without being decoded, so a
    message carrying a 16 MiB chunk costs a few comparisons. Protobuf's rule for a repeated
    singular field is "last one wins", so the whole message is scanned and the last field 1 is
    returned, exactly what the agent will see when it decodes the same bytes.
    """
    view = memoryview(data)
    pos = 0
    found = ""
    end = len(view)
    while pos < end:
        key, pos = _varint(view, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
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
            if field == 1:
                try:
                    found = bytes(view[pos : pos + length]).decode("utf-8")
                except UnicodeDecodeError:
                    raise WireError("instance_id is not valid UTF-8") from None
            pos += length
        else:
            raise WireError(f"unsupported wire type {wire}")
        if pos > end:
            raise WireError("field runs past the end")
        if field == 1 and wire != 2:
            raise WireError("field 1 (instance_id) is not a string")
    return found


def state_name(state: int) -> str:
    """ "RUNNING" for INSTANCE_STATE_RUNNING, and so on."""
    try:
        return instance_pb2.InstanceState.Name(state).removeprefix("INSTANCE_STATE_")  # type: ignore[arg-type]
    except ValueError:
        return f"UNKNOWN({state})"


@dataclass(frozen=True)
class Route:
    """Where an instance's agent listens and how to talk to it."""

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

    def get(self, route: Route) -> grpc.aio.Channel:
        """The channel to `route`'s agent, created on first use."""
        key = (route.target, route.ca_pem, route.server_name)
        channel = self._channels.get(key)
        if channel is not None:
            self._channels.move_to_end(key)
            return channel
        options = list(CHANNEL_OPTIONS)
        if route.target.startswith("unix:"):
            channel = grpc.aio.insecure_channel(route.target, options=options)
        else:
            # A TCP agent is always TLS: its token must never cross a network in clear text.
            creds = grpc.ssl_channel_credentials(root_certificates=route.ca_pem.encode() or None)
            if route.server_name:
                options.append(("grpc.ssl_target_name_override", route.server_name))
            channel = grpc.aio.secure_channel(route.target, creds, options=options)
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


class Router:
    """Resolves (tenant, instance) to a Route through instance_svc, with a short, bounded cache."""

    def __init__(
        self, instance_channel: grpc.aio.Channel, internal_token: str, ttl: float = 5.0, max_entries: int = 10_000
    ) -> None:
        self._stub = routing_pb2_grpc.RoutingServiceStub(instance_channel)
        self._metadata = ((INTERNAL_TOKEN_HEADER, internal_token),)
        self.ttl = ttl
        self._max = max_entries
        # instance_id -> (expires, route). Only RUNNING answers are cached; the tenant is kept in
        # the route and compared on every hit, so a cached route never serves another tenant.
        self._cache: OrderedDict[str, tuple[float, Route]] = OrderedDict()
        self.pool = ChannelPool()

    async def resolve(self, tenant_id: str, instance_id: str, deadline: float | None) -> Route:
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
            raise RpcError(err.code(), err.details() or "") from None
        if reply.state != instance_pb2.INSTANCE_STATE_RUNNING:
            raise failed_precondition(
                f"instance {instance_id} is {state_name(reply.state)}, not RUNNING; "
                "processes, files and the desktop are only reachable while it runs"
            )
        if not reply.agent_target:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"instance {instance_id} has no agent endpoint yet; retry")
        route = Route(
            tenant_id, instance_id, reply.agent_target, reply.agent_token, reply.agent_ca_pem, reply.agent_server_name
        )
        if self.ttl > 0:
            self._cache[instance_id] = (time.monotonic() + self.ttl, route)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return route

    def invalidate(self, instance_id: str, close_channel: bool = False) -> None:
        """Forget the cached route of `instance_id` (and close its channel when the instance is gone)."""
        hit = self._cache.pop(instance_id, None)
        if hit is not None and close_channel:
            self.pool.drop(hit[1].target)

    def clear(self) -> None:
        """Forget every cached route (after missing events)."""
        self._cache.clear()

    def __contains__(self, instance_id: str) -> bool:
        return instance_id in self._cache


_GONE_STATES = {"TERMINATED", "FAILED", "INSTANCE_STATE_TERMINATED", "INSTANCE_STATE_FAILED", "6", "7"}


def parse_event(fields: dict[bytes, bytes]) -> tuple[str, str] | None:
    """(instance_id, state) of a `cyberdesk:events` entry, or None when it names no instance."""
    decoded = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
    instance_id = decoded.get("instance_id") or decoded.get("instance") or ""
    if not instance_id:
        return None
    return instance_id, decoded.get("state") or decoded.get("new_state") or ""


async def follow_events(router: Router, redis_url: str, stop: asyncio.Event) -> None:
    """Drop cache entries on every lifecycle event until `stop` is set.

    Reads new entries only (`$`): older events cannot concern routes cached by this process.
    After a Redis outage every route is dropped, since events may have been missed.
    """
    client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=1.0, socket_timeout=None)
    last_id = "$"
    failed = False
    try:
        while not stop.is_set():
            try:
                replies: Any = await client.xread({EVENTS_STREAM: last_id}, block=1000, count=500)
            except (RedisError, OSError) as err:
                if not failed:
                    _log.warning("not following lifecycle events: redis unreachable", extra={"error": str(err)})
                failed = True
                router.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                continue
            if failed:
                _log.info("following lifecycle events again")
                router.clear()
                failed = False
            for _stream, entries in replies or ():
                for entry_id, fields in entries:
                    last_id = entry_id
                    parsed = parse_event(fields)
                    if parsed is not None:
                        instance_id, state = parsed
                        router.invalidate(instance_id, close_channel=state in _GONE_STATES)
    finally:
        await client.aclose()
