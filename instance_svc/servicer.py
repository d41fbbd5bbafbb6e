"""gRPC servicers: the public InstanceService (behind the gateway) and the internal RoutingService.

Only the gateway calls instance_svc. It authenticates the caller's API key and passes the tenant
as `x-cyberdesk-tenant`; instance_svc believes that header only when the call also carries the
shared internal secret as `x-cyberdesk-internal-token`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from cyberdesk_common.internal_auth import InternalAuth
from cyberdesk_common.status import invalid_argument
from cyberdesk_proto.internal.v1 import routing_pb2, routing_pb2_grpc
from cyberdesk_proto.v1 import instance_pb2, instance_pb2_grpc
from instance_svc import events, paging
from instance_svc.lifecycle import Lifecycle
from instance_svc.states import State
from instance_svc.store import InstanceRecord, SnapshotRecord
from instance_svc.validation import InvalidRequest, MachineLimits, check_labels, validate_create

Context = grpc.aio.ServicerContext[Any, Any]


def _ts(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def instance_proto(rec: InstanceRecord, state: State | None = None) -> instance_pb2.Instance:
    """The public view of a record (env and agent token are never part of it)."""
    msg = instance_pb2.Instance(
        instance_id=rec.id,
        template=rec.template,
        vcpus=rec.vcpus,
        memory_mib=rec.memory_mib,
        disk_mib=rec.disk_mib,
        state=(state or rec.state).value,
        state_message=rec.state_message,
        create_time=_ts(rec.create_time_us),
        expire_time=_ts(rec.expire_time_us),
        timeout_action=rec.timeout_action.value,  # type: ignore[arg-type]
        labels=rec.labels,
        desktop=instance_pb2.DesktopConfig(
            enabled=rec.desktop is not None,
            width=rec.desktop[0] if rec.desktop else 0,
            height=rec.desktop[1] if rec.desktop else 0,
        ),
        network=instance_pb2.NETWORK_MODE_INTERNET if rec.internet else instance_pb2.NETWORK_MODE_NONE,
        egress=instance_pb2.EgressPolicy(allow=rec.egress_allow, deny=rec.egress_deny),
        source_snapshot_id=rec.source_snapshot_id,
        runtime=rec.runtime,
        enforced_limits=[instance_pb2.EnforcedLimit(name=n, value=v, mechanism=m) for n, v, m in rec.limits],
    )
    if rec.end_time_us:
        msg.end_time.CopyFrom(_ts(rec.end_time_us))
    return msg


def snapshot_proto(snap: SnapshotRecord) -> instance_pb2.Snapshot:
    """The public view of a snapshot record (its path on disk stays private)."""
    return instance_pb2.Snapshot(
        snapshot_id=snap.id,
        instance_id=snap.instance_id,
        create_time=_ts(snap.create_time_us),
        size_bytes=snap.size_bytes,
        includes_memory=snap.includes_memory,
        template=snap.template,
        display_name=snap.display_name,
    )


def _paging(size: int, token: str, kind: str) -> tuple[int, paging.Cursor | None]:
    try:
        return paging.page_size(size), paging.decode(token, kind)
    except paging.BadPageRequest as err:
        raise invalid_argument(str(err)) from None


def _timeout_us(request: instance_pb2.SetInstanceTimeoutRequest) -> int:
    if not request.HasField("timeout"):
        raise invalid_argument("timeout is required")
    return request.timeout.seconds * 1_000_000 + request.timeout.nanos // 1000


class InstanceServicer(instance_pb2_grpc.InstanceServiceServicer):
    """cyberdesk.v1.InstanceService, scoped to the tenant the gateway vouches for."""

    def __init__(self, lifecycle: Lifecycle, internal_token: str, limits: MachineLimits, redis_url: str) -> None:
        self._lc = lifecycle
        self._auth = InternalAuth(internal_token)
        self._limits = limits
        self._redis_url = redis_url

    async def _tenant(self, context: Context) -> str:
        tenant = self._auth.tenant(context)
        await self._lc.ready.wait()  # start-up reconciliation first
        return tenant

    async def CreateInstance(
        self, request: instance_pb2.CreateInstanceRequest, context: Context
    ) -> instance_pb2.CreateInstanceResponse:
        """Validate, reserve quota atomically, start (or claim from the warm pool); RUNNING or FAILED."""
        tenant = await self._tenant(context)
        try:
            spec = validate_create(request, self._limits)
        except InvalidRequest as err:
            raise invalid_argument(str(err)) from None
        rec = await self._lc.create(tenant, spec)
        return instance_pb2.CreateInstanceResponse(instance=instance_proto(rec))

    async def GetInstance(
        self, request: instance_pb2.GetInstanceRequest, context: Context
    ) -> instance_pb2.GetInstanceResponse:
        """One instance of the caller's tenant."""
        tenant = await self._tenant(context)
        return instance_pb2.GetInstanceResponse(instance=instance_proto(self._lc.owned(tenant, request.instance_id)))

    async def ListInstances(
        self, request: instance_pb2.ListInstancesRequest, context: Context
    ) -> instance_pb2.ListInstancesResponse:
        """A page of the tenant's instances, newest first, filtered by state and labels."""
        tenant = await self._tenant(context)
        size, cursor = _paging(request.page_size, request.page_token, "i")
        try:
            states = [State(s) for s in request.states]
        except ValueError:
            raise invalid_argument(
                "states: use PENDING, STARTING, RUNNING, PAUSED, STOPPING, TERMINATED or FAILED"
            ) from None
        try:
            check_labels(dict(request.labels))
        except InvalidRequest as err:
            raise invalid_argument(str(err)) from None
        items, nxt = self._lc.store.list_instances(tenant, size, cursor, states, dict(request.labels))
        return instance_pb2.ListInstancesResponse(
            instances=[instance_proto(r) for r in items],
            next_page_token=paging.encode(nxt, "i") if nxt else "",
        )

    async def DeleteInstance(
        self, request: instance_pb2.DeleteInstanceRequest, context: Context
    ) -> instance_pb2.DeleteInstanceResponse:
        """Terminate an instance; idempotent for a terminated one."""
        tenant = await self._tenant(context)
        rec = await self._lc.delete(tenant, request.instance_id)
        return instance_pb2.DeleteInstanceResponse(instance=instance_proto(rec))

    async def SetInstanceTimeout(
        self, request: instance_pb2.SetInstanceTimeoutRequest, context: Context
    ) -> instance_pb2.SetInstanceTimeoutResponse:
        """Move the deadline to now plus the timeout."""
        tenant = await self._tenant(context)
        rec = await self._lc.set_timeout(tenant, request.instance_id, _timeout_us(request))
        return instance_pb2.SetInstanceTimeoutResponse(instance=instance_proto(rec))

    async def PauseInstance(
        self, request: instance_pb2.PauseInstanceRequest, context: Context
    ) -> instance_pb2.PauseInstanceResponse:
        """Freeze a RUNNING instance where the runtime can."""
        tenant = await self._tenant(context)
        rec = await self._lc.pause(tenant, request.instance_id)
        return instance_pb2.PauseInstanceResponse(instance=instance_proto(rec))

    async def ResumeInstance(
        self, request: instance_pb2.ResumeInstanceRequest, context: Context
    ) -> instance_pb2.ResumeInstanceResponse:
        """Thaw a PAUSED instance."""
        tenant = await self._tenant(context)
        rec = await self._lc.resume(tenant, request.instance_id)
        return instance_pb2.ResumeInstanceResponse(instance=instance_proto(rec))

    async def WatchInstances(
        self, request: instance_pb2.WatchInstancesRequest, context: Context
    ) -> AsyncIterator[instance_pb2.WatchInstancesResponse]:
        """Stream the tenant's state changes after `cursor` (or from now), read from the Redis event stream.

        The response headers go out once the watch is in place and carry the cursor it starts
        after (`cyberdesk-watch-cursor`), so a client that is cut off before any change can still
        resume without a gap. Redis unreachable ends the call with UNAVAILABLE (see events.py).
        """
        tenant = await self._tenant(context)
        if request.instance_id:
            self._lc.owned(tenant, request.instance_id)
        opened = await events.open_watch(self._redis_url, tenant, request.instance_id, request.cursor)
        try:
            await context.send_initial_metadata(((events.WATCH_CURSOR_METADATA, opened.start),))
        except BaseException:
            await opened.close()
            raise
        async for stream_id, event in opened:
            rec = self._lc.store.get(event.instance_id)
            if rec is None:
                continue
            yield instance_pb2.WatchInstancesResponse(
                event_id=stream_id,
                cursor=stream_id,
                instance=instance_proto(rec, event.new_state),
                previous_state=event.old_state.value if event.old_state else 0,  # type: ignore[arg-type]
                event_time=_ts(event.time_us),
            )

    async def CreateSnapshot(
        self, request: instance_pb2.CreateSnapshotRequest, context: Context
    ) -> instance_pb2.CreateSnapshotResponse:
        """Archive the instance's writable layer."""
        tenant = await self._tenant(context)
        snap = await self._lc.snapshot(tenant, request.instance_id, request.display_name)
        return instance_pb2.CreateSnapshotResponse(snapshot=snapshot_proto(snap))

    async def GetSnapshot(
        self, request: instance_pb2.GetSnapshotRequest, context: Context
    ) -> instance_pb2.GetSnapshotResponse:
        """One snapshot of the caller's tenant."""
        tenant = await self._tenant(context)
        return instance_pb2.GetSnapshotResponse(
            snapshot=snapshot_proto(self._lc.owned_snapshot(tenant, request.snapshot_id))
        )

    async def ListSnapshots(
        self, request: instance_pb2.ListSnapshotsRequest, context: Context
    ) -> instance_pb2.ListSnapshotsResponse:
        """A page of the tenant's snapshots, newest first."""
        tenant = await self._tenant(context)
        size, cursor = _paging(request.page_size, request.page_token, "s")
        if request.instance_id:
            self._lc.owned(tenant, request.instance_id)
        items, nxt = self._lc.store.list_snapshots(tenant, request.instance_id, size, cursor)
        return instance_pb2.ListSnapshotsResponse(
            snapshots=[snapshot_proto(s) for s in items],
            next_page_token=paging.encode(nxt, "s") if nxt else "",
        )

    async def DeleteSnapshot(
        self, request: instance_pb2.DeleteSnapshotRequest, context: Context
    ) -> instance_pb2.DeleteSnapshotResponse:
        """Delete a snapshot; instances restored from it are unaffected."""
        tenant = await self._tenant(context)
        self._lc.delete_snapshot(tenant, request.snapshot_id)
        return instance_pb2.DeleteSnapshotResponse()


class RoutingServicer(routing_pb2_grpc.RoutingServiceServicer):
    """cyberdesk.internal.v1.RoutingService: where an instance's agent listens."""

    def __init__(self, lifecycle: Lifecycle, internal_token: str) -> None:
        self._lc = lifecycle
        self._auth = InternalAuth(internal_token)

    async def ResolveInstance(
        self, request: routing_pb2.ResolveInstanceRequest, context: Context
    ) -> routing_pb2.ResolveInstanceResponse:
        """The instance's state, and its agent's target and token when it is RUNNING."""
        self._auth.check(context)
        if not request.tenant_id:
            raise invalid_argument("tenant_id is required")
        await self._lc.ready.wait()
        resolved = await self._lc.route(request.tenant_id, request.instance_id)
        reply = routing_pb2.ResolveInstanceResponse(state=resolved.record.state.value)
        if resolved.sandbox is not None:
            endpoint = resolved.sandbox.endpoint
            reply.agent_target = endpoint.target
            reply.agent_token = endpoint.token
            reply.agent_ca_pem = endpoint.ca_pem
            reply.agent_server_name = endpoint.server_name
        return reply
