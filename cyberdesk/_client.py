"""`Cyberdesk`: the blocking client."""

from __future__ import annotations

from collections.abc import Mapping

from cyberdesk._config import resolve
from cyberdesk._instance import Instance
from cyberdesk._models import ApiKey, InstanceData, Snapshot
from cyberdesk._requests import create_request
from cyberdesk._transport import Transport
from cyberdesk_proto.internal.v1 import auth_pb2
from cyberdesk_proto.v1 import instance_pb2

STATES = ("PENDING", "STARTING", "RUNNING", "PAUSED", "STOPPING", "TERMINATED", "FAILED")


def state_filter(states: list[str] | None) -> list[instance_pb2.InstanceState.ValueType]:
    """InstanceState values of state names (case-insensitive)."""
    from cyberdesk._errors import InvalidArgument

    values: list[instance_pb2.InstanceState.ValueType] = []
    for name in states or []:
        upper = name.upper()
        if upper not in STATES:
            raise InvalidArgument(f"unknown state {name!r}; known: {', '.join(STATES)}")
        values.append(instance_pb2.InstanceState.Value("INSTANCE_STATE_" + upper))
    return values


def started(data: InstanceData) -> InstanceData:
    """The data of a created instance; one that could not start raises Unavailable with the reason."""
    if data.state == "FAILED":
        from cyberdesk._errors import Unavailable

        raise Unavailable(f"instance {data.id} failed to start: {data.state_message or 'no reason given'}")
    return data


class Instances:
    """`client.instances`: create, get, list and delete instances."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def create(
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
    ) -> Instance:
        """Create an instance and return it once RUNNING.

        `timeout` is its lifetime in seconds (server default 300); `desktop=True` gives it an X
        desktop; `snapshot_id` restores a snapshot's files; `request_id` makes a retry idempotent.
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
        )
        reply = self._t.unary(self._t.instances.CreateInstance, request, timeout=max(self._t.timeout, 120))
        return Instance(self._t, started(InstanceData.from_proto(reply.instance)))

    def get(self, instance_id: str) -> Instance:
        """One instance by id (NotFound if it is not the caller's)."""
        reply = self._t.unary(self._t.instances.GetInstance, instance_pb2.GetInstanceRequest(instance_id=instance_id))
        return Instance(self._t, InstanceData.from_proto(reply.instance))

    def list(self, *, states: list[str] | None = None, labels: Mapping[str, str] | None = None) -> list[Instance]:
        """The caller's instances, newest first (every page), filtered by states and labels."""
        result: list[Instance] = []
        token = ""
        while True:
            request = instance_pb2.ListInstancesRequest(
                page_size=200,
                page_token=token,
                states=state_filter(states),
                labels=dict(labels or {}),
            )
            reply = self._t.unary(self._t.instances.ListInstances, request)
            result.extend(Instance(self._t, InstanceData.from_proto(i)) for i in reply.instances)
            token = reply.next_page_token
            if not token:
                return result

    def delete(self, instance_id: str) -> None:
        """Terminate an instance."""
        self._t.unary(self._t.instances.DeleteInstance, instance_pb2.DeleteInstanceRequest(instance_id=instance_id))


class Snapshots:
    """`client.snapshots`: list, get and delete snapshots (take one with `instance.snapshot()`)."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def get(self, snapshot_id: str) -> Snapshot:
        """One snapshot."""
        reply = self._t.unary(self._t.instances.GetSnapshot, instance_pb2.GetSnapshotRequest(snapshot_id=snapshot_id))
        return Snapshot.from_proto(reply.snapshot)

    def list(self, instance_id: str | None = None) -> list[Snapshot]:
        """The caller's snapshots (of one instance when given), newest first."""
        result: list[Snapshot] = []
        token = ""
        while True:
            request = instance_pb2.ListSnapshotsRequest(instance_id=instance_id or "", page_size=200, page_token=token)
            reply = self._t.unary(self._t.instances.ListSnapshots, request)
            result.extend(Snapshot.from_proto(s) for s in reply.snapshots)
            token = reply.next_page_token
            if not token:
                return result

    def delete(self, snapshot_id: str) -> None:
        """Delete a snapshot."""
        self._t.unary(self._t.instances.DeleteSnapshot, instance_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id))


class Keys:
    """`client.keys`: API-key management; needs a key with the admin scope."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def create(self, tenant: str, name: str, *, admin: bool = False) -> tuple[ApiKey, str]:
        """Create a key; returns its record and its secret (shown this once only)."""
        scopes = ["instances", "admin"] if admin else ["instances"]
        reply = self._t.unary(
            self._t.auth.CreateKey, auth_pb2.CreateKeyRequest(tenant_id=tenant, name=name, scopes=scopes)
        )
        return ApiKey.from_proto(reply.api_key), reply.secret

    def list(self, tenant: str) -> list[ApiKey]:
        """A tenant's keys, newest first (without secrets)."""
        result: list[ApiKey] = []
        token = ""
        while True:
            reply = self._t.unary(
                self._t.auth.ListKeys, auth_pb2.ListKeysRequest(tenant_id=tenant, page_size=200, page_token=token)
            )
            result.extend(ApiKey.from_proto(k) for k in reply.api_keys)
            token = reply.next_page_token
            if not token:
                return result

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key; gateways refuse it within seconds."""
        return ApiKey.from_proto(
            self._t.unary(self._t.auth.RevokeKey, auth_pb2.RevokeKeyRequest(key_id=key_id)).api_key
        )


class Cyberdesk:
    """The blocking Cyberdesk client.

    `api_key` and `endpoint` fall back to CYBERDESK_API_KEY / CYBERDESK_ENDPOINT, then to the CLI
    config file (written by `cyberdesk up`). `timeout` bounds every unary call in seconds; streams
    (exec, downloads, shells) have no deadline so long commands are never cut off.
    """

    def __init__(self, api_key: str | None = None, endpoint: str | None = None, *, timeout: float = 60.0) -> None:
        self._t = Transport(resolve(api_key, endpoint), timeout)
        self.endpoint = self._t.config.endpoint
        self.instances = Instances(self._t)
        self.snapshots = Snapshots(self._t)
        self.keys = Keys(self._t)

    def close(self) -> None:
        """Close the connection."""
        self._t.close()

    def __enter__(self) -> Cyberdesk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
