"""instance_svc's records as CyberdeskInstance and CyberdeskSnapshot objects (pure: no I/O).

The custom resource is the record: what the operator needs is its spec (docs/kubernetes.md,
"Contract"); what only instance_svc reads (the public state, its message, end time, enforced
limits, the idempotency key) is the annotation RECORD, JSON, written together with the spec in one
conditional write, so the two never disagree. The event outbox (OUTBOX) is in the same object,
so a state change and the event announcing it are one write (the SQLite store's invariant).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from cyberdesk_common.lifecycle_events import LifecycleEvent
from instance_svc.expiry import TimeoutAction
from instance_svc.operator import contract
from instance_svc.states import State
from instance_svc.store import InstanceRecord, SnapshotRecord

# Keys of instance_svc's own (the operator ignores them).
PREFIX = "instance-svc.cyberdesk.io/"
RECORD = PREFIX + "record"
OUTBOX = PREFIX + "outbox"
# Labels: "true"/"false", so that a selector finds live instances and unsent events.
LABEL_LIVE = PREFIX + "live"
LABEL_OUTBOX = PREFIX + "outbox"
# sha256 of the request_id (the key itself may be 128 characters of any case, a label value not).
LABEL_REQUEST = PREFIX + "request"
# The replica that created the instance (its Lease: lease_name(owner)).
OWNER = PREFIX + "owner"
# Keeps a deleted instance's resource (the record of a TERMINATED instance) after the operator's
# finalizer has gone with the VM; instance_svc removes it once the record is past its retention.
FINALIZER = PREFIX + "record"


def rfc3339(us: int) -> str:
    """Microseconds since the epoch as RFC 3339 UTC with microseconds."""
    return datetime.fromtimestamp(us / 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_name(replica_id: str) -> str:
    """The Lease a replica holds while it runs."""
    return f"instance-svc-{replica_id}"[:63].rstrip("-")


def microtime(seconds: float) -> str:
    """A Lease's MicroTime (RFC 3339 with microseconds, UTC)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float | None:
    """Seconds since the epoch of an RFC 3339 time (with or without fractions); None when unreadable."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def request_label(tenant: str, request_id: str) -> str:
    """The label value that finds a tenant's instance by its request_id."""
    return hashlib.sha256(f"{tenant}\0{request_id}".encode()).hexdigest()[:40]


def record_json(rec: InstanceRecord) -> str:
    """The record as the RECORD annotation holds it."""
    return json.dumps(
        {
            "id": rec.id,
            "tenant": rec.tenant,
            "template": rec.template,
            "vcpus": rec.vcpus,
            "memory_mib": rec.memory_mib,
            "disk_mib": rec.disk_mib,
            "state": rec.state.value,
            "state_message": rec.state_message,
            "create_time_us": rec.create_time_us,
            "expire_time_us": rec.expire_time_us,
            "end_time_us": rec.end_time_us,
            "timeout_us": rec.timeout_us,
            "timeout_action": rec.timeout_action.value,
            "runtime": rec.runtime,
            "labels": rec.labels,
            "desktop": list(rec.desktop) if rec.desktop else None,
            "internet": rec.internet,
            "source_snapshot_id": rec.source_snapshot_id,
            "sandbox_id": rec.sandbox_id,
            "limits": [list(lim) for lim in rec.limits],
            "request_id": rec.request_id,
            "egress_allow": list(rec.egress_allow),
            "egress_deny": list(rec.egress_deny),
        },
        sort_keys=True,
    )


def record_of(obj: dict[str, Any]) -> InstanceRecord | None:
    """The record an instance resource holds; None for a resource instance_svc did not write."""
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(RECORD)
    if not raw:
        return None
    d = json.loads(raw)
    desktop = d.get("desktop")
    return InstanceRecord(
        id=d["id"],
        tenant=d["tenant"],
        template=d["template"],
        vcpus=d["vcpus"],
        memory_mib=d["memory_mib"],
        disk_mib=d["disk_mib"],
        state=State(d["state"]),
        state_message=d["state_message"],
        create_time_us=d["create_time_us"],
        expire_time_us=d["expire_time_us"],
        end_time_us=d["end_time_us"],
        timeout_us=d["timeout_us"],
        timeout_action=TimeoutAction(d["timeout_action"]),
        runtime=d["runtime"],
        labels=dict(d["labels"]),
        desktop=(desktop[0], desktop[1]) if desktop else None,
        internet=bool(d["internet"]),
        source_snapshot_id=d["source_snapshot_id"],
        sandbox_id=d["sandbox_id"],
        limits=[(n, v, m) for n, v, m in d["limits"]],
        request_id=d["request_id"],
        egress_allow=tuple(d["egress_allow"]),
        egress_deny=tuple(d["egress_deny"]),
    )


def outbox_of(obj: dict[str, Any]) -> list[dict[str, str]]:
    """The unsent events (LifecycleEvent fields) an instance resource holds."""
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(OUTBOX)
    return list(json.loads(raw)) if raw else []


def event_for(rec: InstanceRecord, old: State | None, now_us: int, event_id: str) -> LifecycleEvent:
    """The lifecycle event announcing `rec`'s state (as store.Store._outbox makes it)."""
    return LifecycleEvent(
        event_id=event_id,
        tenant=rec.tenant,
        instance_id=rec.id,
        old_state=old,
        new_state=rec.state,
        time_us=now_us,
        vcpus=rec.vcpus,
        memory_mib=rec.memory_mib,
        template=rec.template,
        state_message=rec.state_message,
    )


def instance_spec(rec: InstanceRecord, warm_pool: str = "") -> dict[str, Any]:
    """The CyberdeskInstance spec of a record (the operator's half of the resource)."""
    spec: dict[str, Any] = {
        "tenant": rec.tenant,
        "template": rec.template,
        "resources": {"vcpu": rec.vcpus, "memoryMiB": rec.memory_mib, "diskMiB": rec.disk_mib},
        "deadline": rfc3339(rec.expire_time_us),
        "timeoutAction": contract.TIMEOUT_PAUSE
        if rec.timeout_action is TimeoutAction.PAUSE
        else contract.TIMEOUT_TERMINATE,
        "desktop": rec.desktop is not None,
        "paused": False,
    }
    if rec.desktop is not None:
        spec["screen"] = {"width": rec.desktop[0], "height": rec.desktop[1]}
    if rec.internet:
        network: dict[str, Any] = {"mode": contract.NETWORK_INTERNET}
        if rec.egress_allow or rec.egress_deny:
            network["egress"] = {"allow": list(rec.egress_allow), "deny": list(rec.egress_deny)}
        spec["network"] = network
    else:
        spec["network"] = {"mode": contract.NETWORK_NONE}
    if rec.source_snapshot_id:
        spec["sourceSnapshot"] = rec.source_snapshot_id
    elif warm_pool:
        spec["warmPool"] = warm_pool
    if rec.labels:
        spec["labels"] = dict(rec.labels)
    return spec


def instance_object(rec: InstanceRecord, warm_pool: str = "", owner: str = "") -> dict[str, Any]:
    """The whole CyberdeskInstance of a new (PENDING) record, with an empty outbox."""
    labels = {
        contract.LABEL_TENANT: rec.tenant,
        contract.LABEL_INSTANCE: rec.id,
        contract.LABEL_PART_OF: contract.APP_NAME,
        LABEL_LIVE: "true",
        LABEL_OUTBOX: "true",
    }
    annotations = {RECORD: record_json(rec)}
    if owner:
        annotations[OWNER] = owner
    if rec.request_id:
        labels[LABEL_REQUEST] = request_label(rec.tenant, rec.request_id)
        annotations[contract.ANNOTATION_REQUEST_ID] = rec.request_id
    return {
        "apiVersion": contract.API_VERSION,
        "kind": contract.INSTANCE_KIND,
        "metadata": {"name": rec.id, "labels": labels, "annotations": annotations, "finalizers": [FINALIZER]},
        "spec": instance_spec(rec, warm_pool),
    }


def snapshot_object(snapshot_id: str, tenant: str, instance: str, display_name: str) -> dict[str, Any]:
    """A CyberdeskSnapshot to ask the operator for."""
    spec: dict[str, Any] = {"tenant": tenant, "instance": instance}
    if display_name:
        spec["displayName"] = display_name
    return {
        "apiVersion": contract.API_VERSION,
        "kind": contract.SNAPSHOT_KIND,
        "metadata": {
            "name": snapshot_id,
            "labels": {
                contract.LABEL_TENANT: tenant,
                contract.LABEL_INSTANCE: instance,
                contract.LABEL_PART_OF: contract.APP_NAME,
            },
        },
        "spec": spec,
    }


def snapshot_json(snap: SnapshotRecord) -> str:
    """A snapshot record as the RECORD annotation of its CyberdeskSnapshot holds it."""
    return json.dumps(
        {
            "id": snap.id,
            "tenant": snap.tenant,
            "instance_id": snap.instance_id,
            "create_time_us": snap.create_time_us,
            "size_bytes": snap.size_bytes,
            "includes_memory": snap.includes_memory,
            "template": snap.template,
            "display_name": snap.display_name,
            "path": snap.path,
        },
        sort_keys=True,
    )


def snapshot_of(obj: dict[str, Any]) -> SnapshotRecord | None:
    """The snapshot record of a CyberdeskSnapshot; None before instance_svc recorded it (not Ready yet)."""
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(RECORD)
    if not raw:
        return None
    d = json.loads(raw)
    return SnapshotRecord(
        id=d["id"],
        tenant=d["tenant"],
        instance_id=d["instance_id"],
        create_time_us=d["create_time_us"],
        size_bytes=d["size_bytes"],
        includes_memory=bool(d["includes_memory"]),
        template=d["template"],
        display_name=d["display_name"],
        path=d["path"],
    )
