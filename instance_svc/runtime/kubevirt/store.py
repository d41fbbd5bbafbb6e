"""The record store of instance_svc on Kubernetes: every replica reads and writes the same resources.

`KubeStore` keeps `instance_svc.store.Store`'s interface (the lifecycle, the publisher and the
servicer call it unchanged) over the API server instead of a SQLite file:

* an instance's record is its CyberdeskInstance (records.py); every write of it is a merge patch
  carrying the resourceVersion it was decided on, so two replicas (or a replica and the operator,
  whose status writes move the resourceVersion too) never overwrite each other: a 409 reads the
  object again and decides again (a transition the state machine no longer allows is then an
  IllegalRequest, as in the SQLite store);
* a state change and its event are one write (the outbox annotation); the publisher drains it
  (`unsent` / `mark_sent`), so an event is never lost and never invented;
* the per-tenant quota is one ConfigMap per tenant holding the tenant's reservations, replaced
  with its resourceVersion (optimistic concurrency): two creates racing for the last slot, in one
  replica or in two, cannot both win. A reservation is made before the instance's resource
  exists and released when its record ends; one whose resource is gone or ended (a replica died
  in between) is dropped when the quota is tight (`_heal`), after a grace period;
* a request_id is unique per tenant across replicas: the reservation holds it, so a racing
  retry finds the first create's reservation and waits for its resource.

Reads come from the shared watch's cache (watcher.py) once it is synced, falling back to a GET:
a replica sees its own writes at once and another replica's within the watch's latency.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import time
import uuid
from dataclasses import replace
from typing import Any

from cyberdesk_common.status import failed_precondition
from instance_svc import paging, quotas
from instance_svc.operator import contract
from instance_svc.runtime.kubevirt import records
from instance_svc.runtime.kubevirt.kube import ApiException, Kube, conflict, gone
from instance_svc.runtime.kubevirt.watcher import Watcher
from instance_svc.states import LIVE, State, check_transition
from instance_svc.store import Event, InstanceRecord, QuotaExceeded, SnapshotRecord, Store

_log = logging.getLogger("instance_svc.runtime.kubevirt.store")

QUOTA_LABEL = records.PREFIX + "quota"
# A reservation younger than this may belong to a create that has not written its resource yet.
RESERVATION_GRACE_S = 60.0
# An event another replica wrote and has not published after this long is published here too
# (that replica probably died); at least once, consumers de-duplicate on event_id.
ADOPT_EVENTS_AFTER_S = 10.0


class _Settled(Exception):
    """The record is already where a transition would take it (another replica got there first)."""

    def __init__(self, record: InstanceRecord) -> None:
        super().__init__(record.id)
        self.record = record


def quota_name(tenant: str) -> str:
    """The ConfigMap of a tenant's quota reservations."""
    return "cyberdesk-quota-" + hashlib.sha256(tenant.encode()).hexdigest()[:20]


class KubeStore(Store):
    """`Store` over CyberdeskInstance resources (see the module docstring)."""

    def __init__(self, kube: Kube, watcher: Watcher, warm_pools: dict[str, str] | None = None, owner: str = "") -> None:
        # Deliberately not Store.__init__: there is no SQLite file; every method below is overridden.
        self._kube = kube
        self._watch = watcher
        self._warm_pools = warm_pools or {}
        self._owner = owner  # the replica's id, recorded on what it creates (runtime.orphaned_starts)
        self._mine: set[str] = set()  # event ids this replica wrote (published by it first)
        self._seq = itertools.count(1)
        self._seqs: dict[tuple[str, str], int] = {}
        self._by_seq: dict[int, tuple[str, str]] = {}
        # Quota ConfigMaps as last written here: the next write tries them first, saving a GET.
        self._quota_maps: dict[str, Any] = {}

    def close(self) -> None:
        """Nothing to close (the runtime owns the client)."""

    # --- reading -----------------------------------------------------------------------------

    def _obj(self, name: str, fresh: bool = False) -> dict[str, Any] | None:
        if not fresh and self._watch.is_synced:
            cached = self._watch.get(name)
            if cached is not None:
                return cached
        try:
            obj = self._kube.get(contract.INSTANCE_PLURAL, name)
        except ApiException as err:
            if gone(err):
                self._watch.forget(name)
                return None
            raise
        self._watch.remember(obj)
        return obj

    def _all(self, selector: str) -> list[dict[str, Any]]:
        if self._watch.is_synced:
            return self._watch.items()
        return self._kube.list(contract.INSTANCE_PLURAL, selector)[0]

    def get(self, instance_id: str) -> InstanceRecord | None:
        """The instance with this id, of any tenant."""
        obj = self._obj(instance_id)
        return records.record_of(obj) if obj else None

    def by_sandbox(self, sandbox_id: str) -> InstanceRecord | None:
        """The instance of a sandbox: on Kubernetes the sandbox is the instance's own resource."""
        return self.get(sandbox_id)

    def by_request_id(self, tenant: str, request_id: str) -> InstanceRecord | None:
        """The instance a previous create with this idempotency key made, if any."""
        label = records.request_label(tenant, request_id)
        for obj in self._all(f"{records.LABEL_REQUEST}={label}"):
            if (obj["metadata"].get("labels") or {}).get(records.LABEL_REQUEST) != label:
                continue
            rec = records.record_of(obj)
            if rec is not None and rec.tenant == tenant and rec.request_id == request_id:
                return rec
        return None

    def _records(self, selector: str) -> list[InstanceRecord]:
        out = []
        for obj in self._all(selector):
            rec = records.record_of(obj)
            if rec is not None:
                out.append(rec)
        return out

    def live(self) -> list[InstanceRecord]:
        """Every non-terminal instance of every tenant."""
        return [r for r in self._records(f"{records.LABEL_LIVE}=true") if r.state in LIVE]

    def list_instances(
        self,
        tenant: str,
        size: int,
        cursor: paging.Cursor | None,
        states: list[State],
        labels: dict[str, str],
    ) -> tuple[list[InstanceRecord], paging.Cursor | None]:
        """One page of a tenant's instances, newest first, and the cursor of the next page."""
        found = [
            r
            for r in self._records(f"{contract.LABEL_TENANT}={tenant}")
            if r.tenant == tenant
            and (not states or r.state in states)
            and all(r.labels.get(k) == v for k, v in labels.items())
            and (
                cursor is None
                or (r.create_time_us, r.id) < (cursor.create_time_us, cursor.item_id)  # strictly after the cursor
            )
        ]
        found.sort(key=lambda r: (r.create_time_us, r.id), reverse=True)
        items = found[:size]
        nxt = paging.Cursor(items[-1].create_time_us, items[-1].id) if len(found) > size else None
        return items, nxt

    # --- creating ----------------------------------------------------------------------------

    def insert_within_quota(self, rec: InstanceRecord, limits: quotas.Limits) -> tuple[InstanceRecord, bool]:
        """Reserve quota (atomic across replicas), then write the instance's resource; (record, created)."""
        self._check_representable(rec)
        if rec.request_id is not None:
            earlier = self.by_request_id(rec.tenant, rec.request_id)
            if earlier is not None:
                return earlier, False
        request = records.request_label(rec.tenant, rec.request_id) if rec.request_id else ""
        other = self._retry_quota(lambda fresh: self._reserve(rec, limits, request, fresh))
        if other:
            return self._wait_for_request(rec, other), False
        event = records.event_for(rec, None, rec.create_time_us, str(uuid.uuid4()))
        body = records.instance_object(rec, self._warm_pool_for(rec), self._owner)
        body["metadata"]["annotations"][records.OUTBOX] = json.dumps([event.fields()])
        try:
            written = self._kube.create(contract.INSTANCE_PLURAL, body)
        except BaseException as err:
            self._release(rec.tenant, rec.id)
            if isinstance(err, ApiException) and err.status == 422:
                raise failed_precondition(f"the cluster refused the instance: {_reason(err)}") from None
            raise
        self._mine.add(event.event_id)
        self._watch.remember(written)
        return rec, True

    def _check_representable(self, rec: InstanceRecord) -> None:
        for entry in (*rec.egress_allow, *rec.egress_deny):
            if not any(ch == "/" or ch == ":" for ch in entry) and not entry.replace(".", "").isdigit():
                raise failed_precondition(
                    f"egress entry {entry!r} is a host name; the kubevirt runtime filters egress by address "
                    "(a NetworkPolicy): give CIDRs or IP addresses"
                )

    def _warm_pool_for(self, rec: InstanceRecord) -> str:
        from instance_svc.pool import POOL_MEMORY_MIB, POOL_VCPUS
        from instance_svc.validation import DEFAULT_SCREEN, TEMPLATE_DISK_MIB

        pool = self._warm_pools.get(rec.template, "")
        fits = (
            rec.vcpus == POOL_VCPUS
            and rec.memory_mib == POOL_MEMORY_MIB
            and rec.disk_mib == TEMPLATE_DISK_MIB.get(rec.template)
            and not rec.internet
            and not rec.source_snapshot_id
            and rec.desktop == (DEFAULT_SCREEN if rec.template == "desktop" else None)
        )
        return pool if fits else ""

    def _quota_map(self, tenant: str, fresh: bool) -> Any:
        """The tenant's quota ConfigMap: as this replica last wrote it (a 409 says it is stale), or read now."""
        name = quota_name(tenant)
        if not fresh and name in self._quota_maps:
            return copy.deepcopy(self._quota_maps[name])
        try:
            return self._kube.config_map(name)
        except ApiException as err:
            if not gone(err):
                raise
        try:
            made = self._kube.create_config_map(
                name,
                {"tenant": tenant, "reservations": "{}"},
                {QUOTA_LABEL: "true", contract.LABEL_PART_OF: contract.APP_NAME},
            )
            self._quota_maps[name] = made
            return copy.deepcopy(made)
        except ApiException as err:
            if conflict(err):  # another replica made it meanwhile
                return self._kube.config_map(name)
            raise

    def _retry_quota(self, attempt: Any) -> Any:
        """Run `attempt(fresh)` until it wins its conditional write: first on the remembered map, then re-read."""
        fresh = False
        for _ in range(200):
            try:
                return attempt(fresh)
            except ApiException as err:
                if not conflict(err):
                    raise
                fresh = True
        raise RuntimeError("the tenant's quota is being written too often to get a turn; retry")

    def _write_quota(self, cm: Any) -> None:
        self._quota_maps[cm.metadata.name] = self._kube.replace_config_map(cm)

    def _reserve(self, rec: InstanceRecord, limits: quotas.Limits, request: str, fresh: bool) -> str:
        """One attempt (409 when another write won); returns the id of an earlier create of `request`, or ""."""
        cm = self._quota_map(rec.tenant, fresh)
        held: dict[str, dict[str, Any]] = json.loads((cm.data or {}).get("reservations") or "{}")
        if request:
            for instance_id, r in held.items():
                if r.get("request") == request:
                    return instance_id
        problem = self._decide(rec, limits, held)
        if problem and not fresh:
            # The remembered map may miss releases of other replicas: refuse only on what is current.
            raise ApiException(status=409, reason="stale")
        if problem and self._heal(held):
            problem = self._decide(rec, limits, held)
        if problem:
            raise QuotaExceeded(problem)
        held[rec.id] = {
            "vcpus": rec.vcpus,
            "memory_mib": rec.memory_mib,
            "disk_mib": rec.disk_mib,
            "request": request,
            "time": time.time(),
        }
        cm.data = {**(cm.data or {}), "reservations": json.dumps(held, sort_keys=True)}
        self._write_quota(cm)
        return ""

    @staticmethod
    def _decide(rec: InstanceRecord, limits: quotas.Limits, held: dict[str, dict[str, Any]]) -> str | None:
        usage = quotas.Usage(
            len(held),
            sum(r["vcpus"] for r in held.values()),
            sum(r["memory_mib"] for r in held.values()),
            sum(r["disk_mib"] for r in held.values()),
        )
        return quotas.decide(rec.tenant, usage, limits, rec.vcpus, rec.memory_mib, rec.disk_mib)

    def _heal(self, held: dict[str, dict[str, Any]]) -> bool:
        """Drop reservations no live record backs any more (older than the grace); whether any went."""
        now = time.time()
        dropped = False
        for instance_id, r in list(held.items()):
            if now - float(r.get("time", now)) < RESERVATION_GRACE_S:
                continue
            rec = self.get(instance_id)
            if rec is None or rec.state.terminal:
                _log.info("dropping a stale quota reservation", extra={"instance_id": instance_id})
                del held[instance_id]
                dropped = True
        return dropped

    def _release(self, tenant: str, instance_id: str) -> None:
        def attempt(fresh: bool) -> None:
            cm = self._quota_map(tenant, fresh)
            held = json.loads((cm.data or {}).get("reservations") or "{}")
            if instance_id not in held:
                if not fresh:  # the remembered map may predate the reservation: make sure
                    raise ApiException(status=409, reason="stale")
                return
            del held[instance_id]
            cm.data = {**(cm.data or {}), "reservations": json.dumps(held, sort_keys=True)}
            self._write_quota(cm)

        try:
            self._retry_quota(attempt)
        except Exception as err:  # healed later (_heal): the record is terminal
            _log.warning("quota release failed", extra={"instance_id": instance_id, "error": str(err)})

    def _wait_for_request(self, rec: InstanceRecord, instance_id: str) -> InstanceRecord:
        """The record of a racing create with the same request_id, once its resource exists."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = self._obj(instance_id, fresh=True)
            earlier = records.record_of(found) if found else None
            if earlier is not None:
                return earlier
            time.sleep(0.05)
        raise failed_precondition(
            f"request_id {rec.request_id} is being used by a create that has not finished; retry in a moment"
        )

    # --- changing ----------------------------------------------------------------------------

    def _change(
        self, instance_id: str, change: Any, spec: dict[str, Any] | None = None
    ) -> tuple[InstanceRecord, InstanceRecord]:
        """Apply `change(record) -> (new record, event or None)` as one conditional write; (old, new)."""
        fresh = False
        for _ in range(100):
            obj = self._obj(instance_id, fresh=fresh)
            if obj is None:
                raise KeyError(instance_id)
            rec = records.record_of(obj)
            if rec is None:
                raise KeyError(instance_id)
            new, event = change(rec)
            meta: dict[str, Any] = {
                "resourceVersion": obj["metadata"].get("resourceVersion"),
                "annotations": {records.RECORD: records.record_json(new)},
                "labels": {records.LABEL_LIVE: "true" if new.state in LIVE else "false"},
            }
            if event is not None:
                meta["annotations"][records.OUTBOX] = json.dumps([*records.outbox_of(obj), event.fields()])
                meta["labels"][records.LABEL_OUTBOX] = "true"
            patch: dict[str, Any] = {"metadata": meta}
            if spec:
                patch["spec"] = spec
            try:
                written = self._kube.patch(contract.INSTANCE_PLURAL, instance_id, patch)
            except ApiException as err:
                if conflict(err):
                    fresh = True
                    continue
                if gone(err):
                    self._watch.forget(instance_id)
                    raise KeyError(instance_id) from None
                raise
            if event is not None:
                self._mine.add(event.event_id)
            self._watch.remember(written)
            return rec, new
        raise RuntimeError(f"instance {instance_id}: too many concurrent writes")

    def transition(
        self, instance_id: str, new: State, now_us: int, message: str | None = None, **changes: Any
    ) -> InstanceRecord:
        """Move an instance to `new` (checked by the state machine), with its event, in one write."""

        def change(rec: InstanceRecord) -> tuple[InstanceRecord, Event]:
            if rec.state == new or (rec.state.terminal and new.terminal):
                # Another replica made this very move (or ended the instance) first: nothing to write.
                raise _Settled(rec)
            check_transition(instance_id, rec.state, new)
            updates: dict[str, Any] = {"state": new, **changes}
            if message is not None:
                updates["state_message"] = message
            if new.terminal:
                updates["end_time_us"] = now_us
            if "limits" in updates:
                updates["limits"] = [tuple(x) for x in updates["limits"]]
            after = replace(rec, **updates)
            return after, records.event_for(after, rec.state, now_us, str(uuid.uuid4()))

        spec = {"deadline": records.rfc3339(changes["expire_time_us"])} if "expire_time_us" in changes else None
        try:
            old, rec = self._change(instance_id, change, spec)
        except _Settled as settled:
            return settled.record
        if rec.state.terminal and not old.state.terminal:
            self._release(rec.tenant, rec.id)
        return rec

    def update(self, instance_id: str, **changes: Any) -> InstanceRecord:
        """Change fields that are not the state (the deadline: also the spec the operator arms); no event."""
        if "limits" in changes:
            changes["limits"] = [tuple(x) for x in changes["limits"]]
        spec = {"deadline": records.rfc3339(changes["expire_time_us"])} if "expire_time_us" in changes else None
        _old, rec = self._change(instance_id, lambda r: (replace(r, **changes), None), spec)
        return rec

    # --- the outbox --------------------------------------------------------------------------

    def unsent(self, limit: int = 500) -> list[tuple[int, Event]]:
        """The oldest events not yet on the stream: this replica's, and others' left unsent too long."""
        now_us = int(time.time() * 1_000_000)
        found: list[tuple[int, str, Event]] = []
        for obj in self._all(f"{records.LABEL_OUTBOX}=true"):
            if (obj["metadata"].get("labels") or {}).get(records.LABEL_OUTBOX) != "true":
                continue
            name = obj["metadata"]["name"]
            for fields in records.outbox_of(obj):
                event = Event.from_fields(fields)
                if event.event_id not in self._mine and now_us - event.time_us < ADOPT_EVENTS_AFTER_S * 1_000_000:
                    continue
                found.append((event.time_us, name, event))
        found.sort(key=lambda t: t[0])
        out: list[tuple[int, Event]] = []
        for _t, name, event in found[:limit]:
            key = (name, event.event_id)
            seq = self._seqs.get(key)
            if seq is None:
                seq = self._seqs[key] = next(self._seq)
                self._by_seq[seq] = key
            out.append((seq, event))
        return out

    def mark_sent(self, seqs: list[int]) -> None:
        """Remove published events from their resources' outboxes."""
        by_name: dict[str, set[str]] = {}
        for seq in seqs:
            key = self._by_seq.pop(seq, None)
            if key is None:
                continue
            self._seqs.pop(key, None)
            by_name.setdefault(key[0], set()).add(key[1])
        for name, ids in by_name.items():
            self._drop_events(name, ids)
            self._mine -= ids

    def _drop_events(self, name: str, ids: set[str]) -> None:
        fresh = False
        for _ in range(100):
            obj = self._obj(name, fresh=fresh)
            if obj is None:
                return
            left = [f for f in records.outbox_of(obj) if f.get("event_id") not in ids]
            meta = {
                "resourceVersion": obj["metadata"].get("resourceVersion"),
                "annotations": {records.OUTBOX: json.dumps(left)},
                "labels": {records.LABEL_OUTBOX: "true" if left else "false"},
            }
            try:
                self._watch.remember(self._kube.patch(contract.INSTANCE_PLURAL, name, {"metadata": meta}))
                return
            except ApiException as err:
                if conflict(err):
                    fresh = True
                    continue
                if gone(err):
                    return
                raise

    # --- snapshots ---------------------------------------------------------------------------

    def add_snapshot(self, snap: SnapshotRecord) -> None:
        """Record a Ready snapshot on its CyberdeskSnapshot."""
        patch = {"metadata": {"annotations": {records.RECORD: records.snapshot_json(snap)}}}
        self._kube.patch(contract.SNAPSHOT_PLURAL, snap.id, patch)

    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        """The snapshot with this id, of any tenant."""
        try:
            obj = self._kube.get(contract.SNAPSHOT_PLURAL, snapshot_id)
        except ApiException as err:
            if gone(err):
                return None
            raise
        if obj["metadata"].get("deletionTimestamp"):
            return None
        return records.snapshot_of(obj)

    def _snapshots(self, selector: str) -> list[SnapshotRecord]:
        out = []
        for obj in self._kube.list(contract.SNAPSHOT_PLURAL, selector)[0]:
            snap = records.snapshot_of(obj)
            if snap is not None and not obj["metadata"].get("deletionTimestamp"):
                out.append(snap)
        return out

    def snapshot_paths(self) -> set[str]:
        """The (nominal) path of every snapshot: none is a file of this host on Kubernetes."""
        return {s.path for s in self._snapshots("")}

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete the CyberdeskSnapshot (the operator deletes its VirtualMachineSnapshot)."""
        self._kube.delete(contract.SNAPSHOT_PLURAL, snapshot_id)

    def list_snapshots(
        self, tenant: str, instance_id: str, size: int, cursor: paging.Cursor | None
    ) -> tuple[list[SnapshotRecord], paging.Cursor | None]:
        """One page of a tenant's snapshots (optionally of one instance), newest first."""
        found = [
            s
            for s in self._snapshots(f"{contract.LABEL_TENANT}={tenant}")
            if s.tenant == tenant
            and (not instance_id or s.instance_id == instance_id)
            and (cursor is None or (s.create_time_us, s.id) < (cursor.create_time_us, cursor.item_id))
        ]
        found.sort(key=lambda s: (s.create_time_us, s.id), reverse=True)
        items = found[:size]
        nxt = paging.Cursor(items[-1].create_time_us, items[-1].id) if len(found) > size else None
        return items, nxt


def _reason(err: ApiException) -> str:
    try:
        return str(json.loads(err.body or "{}").get("message") or err.reason)
    except ValueError:
        return str(err.reason)
