"""`AsyncCyberdesk`, the client, and `client.instances`."""

# `timeout` arguments are an instance's lifetime in the API, not a deadline of the call itself.
# ruff: noqa: ASYNC109
from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from cyberdesk._async import _retry
from cyberdesk._async._transport import AsyncTransport
from cyberdesk._async.instance import AsyncInstance
from cyberdesk._async.keys import AsyncKeys
from cyberdesk._async.snapshots import AsyncSnapshots
from cyberdesk._async.watch import AsyncInstanceWatch
from cyberdesk._config import resolve
from cyberdesk._errors import Unavailable
from cyberdesk._models import InstanceData, Plan, UsageReport, instance_started, unread_instance, usage_report
from cyberdesk._requests import create_request, state_filter, usage_request
from cyberdesk._watch import Backoff
from cyberdesk_proto.v1 import billing_pb2, instance_pb2

# How long create() keeps retrying UNAVAILABLE: long enough for a gateway or instance_svc to be
# restarted (a rolling update, a crash and its supervisor's restart), short enough that a stack
# that is really down is reported within a minute.
CREATE_RETRY_SECONDS = 60.0


class AsyncInstances:
    """`client.instances`: create, get, list and delete instances."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def create(
        self,
        template: str = "base",
        *,
        timeout: float | None = None,
        desktop: bool = False,
        width: int = 0,
        height: int = 0,
        vcpus: int = 0,
        memory_mib: int = 0,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        internet: bool = False,
        snapshot_id: str | None = None,
        request_id: str | None = None,
        pause_on_timeout: bool = False,
        disk_mib: int = 0,
        allow: Sequence[str] | None = None,
        deny: Sequence[str] | None = None,
    ) -> AsyncInstance:
        """Create an instance and return it once RUNNING.

        `timeout` is its lifetime in seconds (server default 300); `desktop=True` gives it an X
        desktop; `snapshot_id` restores a snapshot's files. `request_id` (a new UUID unless given)
        makes the call idempotent: UNAVAILABLE is retried with back-off for up to a minute and can
        never make a second instance; pass your own to retry across processes.
        `disk_mib` is the size of its disk (default the template's: 2048 for "base"); writes
        beyond it fail with ENOSPC inside. `internet=True` gives it outbound network access,
        which `allow` narrows to those destinations and `deny` cuts out of (CIDRs, addresses,
        host names, "*.example.com" for subdomains); allow/deny without internet=True raise
        InvalidArgument, as does an entry the server cannot read (its message names it).
        """
        # Always a request_id: it is what makes the retries below safe (see _create_with_retries).
        request_id = request_id or str(uuid.uuid4())
        request = create_request(
            template,
            timeout=timeout,
            desktop=desktop,
            width=width,
            height=height,
            vcpus=vcpus,
            memory_mib=memory_mib,
            env=env,
            labels=labels,
            internet=internet,
            snapshot_id=snapshot_id,
            request_id=request_id,
            pause_on_timeout=pause_on_timeout,
            disk_mib=disk_mib,
            allow=allow,
            deny=deny,
        )
        reply = await self._create_with_retries(request)
        return AsyncInstance(self._t, instance_started(InstanceData.from_proto(reply.instance)))

    async def _create_with_retries(self, request: instance_pb2.CreateInstanceRequest) -> Any:
        """CreateInstance, retried on UNAVAILABLE with back-off for up to CREATE_RETRY_SECONDS.

        Only UNAVAILABLE is retried. It means the request did not reach a server that could
        answer (gateway or instance_svc restarting, connection dropped); whether or not the first
        attempt got as far as creating something, the request_id makes the retry return that same
        instance instead of a second one. DEADLINE_EXCEEDED is not retried: the call was bounded
        by the caller's own time, and spending more of it is not this method's decision. Other
        codes are answers (a bad template, a quota) that a retry would only repeat.
        """
        backoff = Backoff(first=0.5, cap=5.0, give_up_after=CREATE_RETRY_SECONDS)
        while True:
            try:
                return await self._t.unary(self._t.instances.CreateInstance, request, timeout=max(self._t.timeout, 120))
            except Unavailable:
                delay = backoff.next_delay()
                if delay is None:
                    raise
                await _retry.sleep(delay)

    async def watch(
        self, instance_id: str | None = None, *, cursor: str | None = None, give_up_after: float = 300.0
    ) -> AsyncInstanceWatch:
        """Watch the lifecycle changes of the caller's instances (or of one); returns once the watch is in place.

        Iterate it for `InstanceEvent`s. Every change after that point (or after `cursor`, the
        `InstanceEvent.cursor` of an earlier watch) is seen once, in order, even across a
        restart of the event store or of the services: the watch reconnects by itself with
        back-off and resumes where it was. A cursor older than the server's retention raises
        CyberdeskError with code OUT_OF_RANGE; a revoked key ends it with Unauthenticated.
        """
        watch = AsyncInstanceWatch(self._t, instance_id or "", cursor or "", give_up_after)
        await watch._start()
        return watch

    async def get(self, instance_id: str) -> AsyncInstance:
        """One instance by id (NotFound if it is not the caller's)."""
        request = instance_pb2.GetInstanceRequest(instance_id=instance_id)
        reply = await self._t.unary(self._t.instances.GetInstance, request)
        return AsyncInstance(self._t, InstanceData.from_proto(reply.instance))

    def handle(self, instance_id: str) -> AsyncInstance:
        """An instance by id without a call: exec, files, desktop... work at once.

        Its attributes are not read (state UNKNOWN) until `refresh()` or a lifecycle call; an id
        that is not the caller's fails at the first call that uses it. `get` reads it first.
        """
        return AsyncInstance(self._t, unread_instance(instance_id))

    async def list(
        self, *, states: list[str] | None = None, labels: Mapping[str, str] | None = None
    ) -> list[AsyncInstance]:
        """The caller's instances, newest first (every page), filtered by states and labels."""
        result: list[AsyncInstance] = []
        token = ""
        while True:
            request = instance_pb2.ListInstancesRequest(
                page_size=200,
                page_token=token,
                states=state_filter(states),
                labels=dict(labels or {}),
            )
            reply = await self._t.unary(self._t.instances.ListInstances, request)
            result.extend(AsyncInstance(self._t, InstanceData.from_proto(i)) for i in reply.instances)
            token = reply.next_page_token
            if not token:
                return result

    async def delete(self, instance_id: str) -> None:
        """Terminate an instance."""
        request = instance_pb2.DeleteInstanceRequest(instance_id=instance_id)
        await self._t.unary(self._t.instances.DeleteInstance, request)


class AsyncCyberdesk:
    """The Cyberdesk client.

    `api_key` and `endpoint` fall back to CYBERDESK_API_KEY / CYBERDESK_ENDPOINT, then to the CLI
    config file (written by `cyberdesk up`). `timeout` bounds every unary call in seconds; exec
    and streams (downloads, shells) have no deadline so long commands are never cut off.
    """

    def __init__(self, api_key: str | None = None, endpoint: str | None = None, *, timeout: float = 60.0) -> None:
        self._t = AsyncTransport(resolve(api_key, endpoint), timeout)
        self.endpoint = self._t.config.endpoint
        self.instances = AsyncInstances(self._t)
        self.snapshots = AsyncSnapshots(self._t)
        self.keys = AsyncKeys(self._t)

    async def usage(
        self,
        *,
        since: _dt.datetime | None = None,
        until: _dt.datetime | None = None,
        instance_id: str | None = None,
    ) -> UsageReport:
        """The tenant's metered usage from `since` (default: the start of this month, UTC) to `until` (default now).

        In total and by instance (every page). A running instance's usage is counted up to now.
        Naive datetimes are taken as UTC; an unknown `instance_id` raises NotFound.
        """
        pages = []
        token = ""
        while True:
            request = usage_request(since, until, instance_id or "", token)
            reply = await self._t.unary(self._t.billing.GetUsage, request)
            pages.append(reply)
            token = reply.next_page_token
            if not token:
                return usage_report(pages)

    async def plan(self) -> Plan:
        """The tenant's plan: its limits and how much of each is used now."""
        reply = await self._t.unary(self._t.billing.GetPlan, billing_pb2.GetPlanRequest())
        return Plan.from_proto(reply)

    async def close(self) -> None:
        """Close the connection."""
        await self._t.close()

    async def __aenter__(self) -> AsyncCyberdesk:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
