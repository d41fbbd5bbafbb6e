"""`client.snapshots`: list, get and delete snapshots (take one with `instance.snapshot()`)."""

from __future__ import annotations

from cyberdesk._async._transport import AsyncTransport
from cyberdesk._models import Snapshot
from cyberdesk_proto.v1 import instance_pb2


class AsyncSnapshots:
    """`client.snapshots`: list, get and delete snapshots (take one with `instance.snapshot()`)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def get(self, snapshot_id: str) -> Snapshot:
        """One snapshot."""
        request = instance_pb2.GetSnapshotRequest(snapshot_id=snapshot_id)
        reply = await self._t.unary(self._t.instances.GetSnapshot, request)
        return Snapshot.from_proto(reply.snapshot)

    async def list(self, instance_id: str | None = None) -> list[Snapshot]:
        """The caller's snapshots (of one instance when given), newest first."""
        result: list[Snapshot] = []
        token = ""
        while True:
            request = instance_pb2.ListSnapshotsRequest(instance_id=instance_id or "", page_size=200, page_token=token)
            reply = await self._t.unary(self._t.instances.ListSnapshots, request)
            result.extend(Snapshot.from_proto(s) for s in reply.snapshots)
            token = reply.next_page_token
            if not token:
                return result

    async def delete(self, snapshot_id: str) -> None:
        """Delete a snapshot."""
        request = instance_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id)
        await self._t.unary(self._t.instances.DeleteSnapshot, request)
