"""`AsyncCyberdesk`, the client, and `client.instances`."""

# `timeout` arguments are an instance's lifetime in the API, not a deadline of the call itself.
# ruff: noqa: ASYNC109
from __future__ import annotations

from collections.abc import Mapping, Sequence

from cyberdesk._async._transport import AsyncTransport
from cyberdesk._async.instance import AsyncInstance
from cyberdesk._async.keys import AsyncKeys
from cyberdesk._async.snapshots import AsyncSnapshots
from cyberdesk._config import resolve
from cyberdesk._models import InstanceData, instance_started, unread_instance
from cyberdesk._requests import create_request, state_filter
from cyberdesk_proto.v1 import instance_pb2


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
        desktop; `snapshot_id` restores a snapshot's files; `request_id` makes a retry idempotent.
        `disk_mib` is the size of its disk (default the template's: 2048 for "base"); writes
        beyond it fail with ENOSPC inside. `internet=True` gives it outbound network access,
        which `allow` narrows to those destinations and `deny` cuts out of (CIDRs, addresses,
        host names, "*.example.com" for subdomains); allow/deny without internet=True raise
        InvalidArgument, as does an entry the server cannot read (its message names it).
        """
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
        reply = await self._t.unary(self._t.instances.CreateInstance, request, timeout=max(self._t.timeout, 120))
        return AsyncInstance(self._t, instance_started(InstanceData.from_proto(reply.instance)))

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

    async def close(self) -> None:
        """Close the connection."""
        await self._t.close()

    async def __aenter__(self) -> AsyncCyberdesk:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
