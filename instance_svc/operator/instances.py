"""The reconciler of one CyberdeskInstance: from its spec to a running VM whose agent answers.

`reconcile` is level-triggered and idempotent: it looks at what exists (kopf's indexes of VMs and
VMIs, the instance's status), does the next step(s) and writes the status; called again with the
same world it writes nothing. Names are deterministic, so a retry, a duplicate event or an operator
killed half-way never makes a second VM: a create that meets an existing object of ours adopts it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from instance_svc.operator import agent, contract, manifests
from instance_svc.operator.kube import KubeError, path
from instance_svc.operator.state import OperatorState, condition, now, parse_time, rfc3339
from instance_svc.runtime.base import AgentEndpoint

Obj = dict[str, Any]

VM_URL = (contract.KUBEVIRT_GROUP, contract.KUBEVIRT_VERSION, contract.VM_PLURAL)
TEMPLATE_CACHE_SECONDS = 60.0


def _rv(obj: Mapping[str, Any]) -> int:
    try:
        return int(obj.get("metadata", {}).get("resourceVersion", -1))
    except (TypeError, ValueError):
        return -1


def one(index: Any, key: Any) -> Any:
    """The single value a kopf index holds under `key`, or None."""
    store = index.get(key) if index is not None else None
    return next(iter(store), None) if store else None


class Stop(Exception):
    """End this pass here; the next is due in `retry` seconds (None: only on an event)."""

    def __init__(self, retry: float | None = None) -> None:
        super().__init__()
        self.retry = retry


@dataclass
class Memo:
    """What one reconciler remembers between passes (lost on restart, where it is rebuilt)."""

    template: Obj | None = None
    secret: Obj | None = None
    vm_seen: bool = False
    ensured: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    agent_ok: tuple[str, str] | None = None  # (VMI uid, endpoint) the agent answered on
    retry: float = 0.05
    pause_sent: bool | None = None
    cleaned: bool = False
    vm_written: bool = False
    # The status as our last write left it (the watch event carrying it may not have arrived yet).
    status: Obj | None = None
    status_rv: int = -1


@dataclass
class View:
    """One pass's inputs."""

    body: Mapping[str, Any]
    vms: Any
    vmis: Any
    vm_owners: Any
    pool_members: Any

    @property
    def meta(self) -> Mapping[str, Any]:
        meta: Mapping[str, Any] = self.body["metadata"]
        return meta

    @property
    def spec(self) -> Mapping[str, Any]:
        return self.body.get("spec") or {}

    known: Obj | None = None  # the status after our own last write, when newer than body's

    @property
    def status(self) -> Mapping[str, Any]:
        if self.known is not None:
            return self.known
        status: Mapping[str, Any] = self.body.get("status") or {}
        return status


class Reconciler:
    def __init__(
        self, state: OperatorState, namespace: str, name: str, log: logging.Logger | logging.LoggerAdapter[Any]
    ) -> None:
        self.state = state
        self.ns = namespace
        self.name = name
        self.log = log
        self.memo = Memo()

    # -- helpers -----------------------------------------------------------------------------------

    @property
    def kube(self) -> Any:
        return self.state.kube

    def _url(self, group: str, version: str, plural: str, name: str = "", sub: str = "") -> str:
        return path(group, version, plural, self.ns, name, sub)

    def _owner(self, v: View) -> Obj:
        return manifests.owner_ref(
            {"apiVersion": contract.API_VERSION, "kind": contract.INSTANCE_KIND, "metadata": v.meta}
        )

    def _labels(self, v: View, vm_name: str) -> dict[str, str]:
        return manifests.common_labels(vm_name, instance=self.name, tenant=str(v.spec.get("tenant", "")))

    def _annotations(self, v: View) -> dict[str, str]:
        return {
            contract.ANNOTATION_INSTANCE_UID: v.meta["uid"],
            contract.ANNOTATION_WRITTEN_BY: self.state.settings.operator_id,
        }

    async def _status(self, v: View, patch: Obj) -> None:
        """Merge `patch` into the status when it changes anything (a no-op write costs a request)."""
        current = v.status
        changed = {k: val for k, val in patch.items() if current.get(k) != val}
        if not changed:
            return
        if "conditions" in changed:
            # Conditions whose only change is their timestamp are not a change.
            def strip(cs: Any) -> Any:
                return [{k: c.get(k) for k in ("type", "status", "reason", "message")} for c in cs or []]

            if strip(changed["conditions"]) == strip(current.get("conditions")):
                changed.pop("conditions")
                if not changed:
                    return
        changed["observedGeneration"] = v.meta.get("generation", 0)
        written = await self.kube.patch(
            self._url(contract.GROUP, contract.VERSION, contract.INSTANCE_PLURAL, self.name, "status"),
            {"status": changed},
        )
        v.known = dict(written.get("status") or {})
        self.memo.status = v.known
        self.memo.status_rv = _rv(written)

    async def _template(self, v: View) -> Obj | None:
        if self.memo.template is None:
            key = (self.ns, str(v.spec.get("template", "")))
            cached = self.state.templates.get(key)
            if cached is not None and time.monotonic() - cached[0] < TEMPLATE_CACHE_SECONDS:
                self.memo.template = cached[1]
            else:
                self.memo.template = await self.kube.get(
                    self._url(contract.GROUP, contract.VERSION, contract.TEMPLATE_PLURAL, key[1])
                )
                if self.memo.template is not None:
                    self.state.templates[key] = (time.monotonic(), self.memo.template)
        return self.memo.template

    def _port(self) -> int:
        spec = (self.memo.template or {}).get("spec") or {}
        return int(spec.get("agentPort", contract.DEFAULT_AGENT_PORT))

    async def _fail(self, v: View, reason: str, message: str) -> Stop:
        """Mark the instance Failed (terminal); returns the Stop to raise."""
        self.log.warning("instance %s failed: %s: %s", self.name, reason, message)
        await self._status(
            v,
            {"phase": contract.PHASE_FAILED, "reason": reason, "message": message, "endTime": rfc3339(now())},
        )
        return Stop(None)

    def view(self, body: Mapping[str, Any], vms: Any, vmis: Any, vm_owners: Any, pool_members: Any) -> View:
        v = View(body, vms, vmis, vm_owners, pool_members)
        if self.memo.status is not None and self.memo.status_rv > _rv(body):
            v.known = self.memo.status
        return v

    # -- the pass ----------------------------------------------------------------------------------

    async def reconcile(self, v: View) -> float | None:
        """One pass; returns seconds until the next one is due without any event (None: only on events)."""
        phase = v.status.get("phase")
        if phase in contract.TERMINAL_PHASES:
            if phase == contract.PHASE_EXPIRED and v.status.get("vmName") and not self.memo.cleaned:
                await self._delete_vm(v, str(v.status["vmName"]))  # idempotent: a restart after a half-done expiry
                self.memo.cleaned = True
            return None
        deadline = parse_time(str(v.spec["deadline"]))
        remaining = (deadline - now()).total_seconds()
        action = v.spec.get("timeoutAction", contract.TIMEOUT_TERMINATE)
        if remaining <= 0 and action != contract.TIMEOUT_PAUSE:
            return await self._expire(v)
        try:
            vm_name = await self._vm_name(v)
            await self._ensure(v, vm_name)
            retry = await self._mirror(
                v, vm_name, paused_by_deadline=remaining <= 0 and action == contract.TIMEOUT_PAUSE
            )
        except Stop as stop:
            return self._next(remaining, stop.retry)
        return self._next(remaining, retry)

    def _next(self, remaining: float, retry: float | None) -> float | None:
        waits = [w for w in (retry, remaining if remaining > 0 else None) if w is not None]
        return min(waits) if waits else None

    def _backoff(self) -> float:
        delay = self.memo.retry
        self.memo.retry = min(self.memo.retry * 2, self.state.settings.retry_max)
        return delay

    async def _expire(self, v: View) -> float | None:
        for vm_name in {str(v.status.get("vmName") or ""), str(one(v.vm_owners, v.meta["uid"]) or "")} - {""}:
            await self._delete_vm(v, vm_name)
        self.log.info("instance %s reached its deadline: VM deleted", self.name)
        await self._status(
            v,
            {
                "phase": contract.PHASE_EXPIRED,
                "reason": contract.REASON_DEADLINE_REACHED,
                "message": "the instance reached its deadline",
                "endTime": rfc3339(now()),
                "agentEndpoint": None,
                "expiry": v.spec["deadline"],
            },
        )
        return None

    async def _delete_vm(self, v: View, vm_name: str) -> None:
        vm = one(v.vms, (self.ns, vm_name))
        if vm is not None and vm["instance_uid"] not in ("", v.meta["uid"]):
            return  # not ours
        if await self.kube.delete(self._url(*VM_URL, vm_name)):
            self.log.info("instance %s: VirtualMachine %s deleted", self.name, vm_name)
        await self.kube.delete(path("networking.k8s.io", "v1", "networkpolicies", self.ns, vm_name))
        await self.kube.delete(path("", "v1", "secrets", self.ns, contract.secret_name(vm_name)))
        self.memo.cleaned = True

    # -- which VM ----------------------------------------------------------------------------------

    async def _vm_name(self, v: View) -> str:
        if v.status.get("vmName"):
            return str(v.status["vmName"])
        # A VM already carrying our uid (a claim or create whose status write a crash cut off).
        mine = one(v.vm_owners, v.meta["uid"])
        if mine is not None:
            await self._status(
                v, {"vmName": mine, **({"claimedFrom": v.spec["warmPool"]} if mine != self.name else {})}
            )
            return str(mine)
        if v.spec.get("warmPool"):
            claimed = await self._claim(v)
            if claimed:
                return claimed
        return self.name

    async def _claim(self, v: View) -> str | None:
        pool_name = str(v.spec["warmPool"])
        pool = self.state.pools.get((self.ns, pool_name)) or await self.kube.get(
            self._url(contract.GROUP, contract.VERSION, contract.WARM_POOL_PLURAL, pool_name)
        )
        gen = int(v.meta.get("generation", 0))

        async def unclaimed(reason: str, message: str) -> None:
            await self._status(
                v,
                {"conditions": [condition(contract.CONDITION_WARM_POOL_CLAIMED, False, reason, message, None, gen)]},
            )

        if pool is None:
            await unclaimed(contract.REASON_WARM_POOL_EMPTY, f"warm pool {pool_name!r} does not exist")
            return None
        if manifests.Shape.of(pool.get("spec") or {}) != manifests.Shape.of(v.spec):
            await unclaimed(
                contract.REASON_WARM_POOL_MISMATCH, f"warm pool {pool_name!r} has other templates or resources"
            )
            return None
        members = sorted(
            (
                m
                for m in (v.pool_members.get((self.ns, pool_name)) or [])
                if m["state"] == contract.POOL_STATE_READY and not m["deleting"]
            ),
            key=lambda m: m["name"],
        )
        if not members:
            # The watch can lag behind a busy API server: ask it, rather than start cold needlessly.
            selector = f"{contract.LABEL_POOL}={pool_name},{contract.LABEL_POOL_STATE}={contract.POOL_STATE_READY}"
            listed = await self.kube.request("GET", self._url(*VM_URL), query={"labelSelector": selector})
            members = sorted(
                (
                    {"name": o["metadata"]["name"], "rv": o["metadata"]["resourceVersion"]}
                    for o in listed.get("items") or []
                    if not o["metadata"].get("deletionTimestamp")
                ),
                key=lambda m: m["name"],
            )
        owner = self._owner(v)
        for member in members:
            labels = self._labels(v, member["name"])
            patch = {
                "metadata": {
                    "resourceVersion": member["rv"],  # optimistic concurrency: a 409 means another claim won
                    "labels": {**labels, contract.LABEL_POOL: None, contract.LABEL_POOL_STATE: None},
                    "annotations": self._annotations(v),
                    "ownerReferences": [owner],
                }
            }
            try:
                await self.kube.patch(self._url(*VM_URL, member["name"]), patch)
            except KubeError as e:
                if e.status in (404, 409):
                    continue
                raise
            self.log.info("instance %s claimed warm VM %s from %s", self.name, member["name"], pool_name)
            self.memo.ensured.add("status")  # the claim's status write below carries it
            await self._status(
                v,
                {
                    "vmName": member["name"],
                    "claimedFrom": pool_name,
                    "phase": contract.PHASE_STARTING,
                    "agentSecret": contract.secret_name(member["name"]),
                    "agentServerName": contract.agent_server_name(member["name"]),
                    "expiry": v.spec["deadline"],
                    "reason": None,
                    "message": None,
                    "conditions": [
                        condition(
                            contract.CONDITION_WARM_POOL_CLAIMED,
                            True,
                            contract.REASON_CLAIMED,
                            f"claimed {member['name']}",
                            None,
                            gen,
                        )
                    ],
                },
            )
            return str(member["name"])
        await unclaimed(contract.REASON_WARM_POOL_EMPTY, f"warm pool {pool_name!r} has no ready VM")
        return None

    # -- the objects -------------------------------------------------------------------------------

    async def _ensure(self, v: View, vm_name: str) -> None:
        """Secret, VM (or restore), NetworkPolicy; raises Stop when the pass must end here."""
        vm = one(v.vms, (self.ns, vm_name))
        if vm is not None and vm["instance_uid"] not in ("", v.meta["uid"]):
            # A VM of this name serves another (deleted) instance of the same name: its garbage
            # collection is underway; never adopt it.
            await self._status(
                v,
                {
                    "phase": contract.PHASE_PENDING,
                    "reason": contract.REASON_WAITING_FOR_OLD_VM,
                    "message": "an older VM of this name is being removed",
                },
            )
            raise Stop(self._backoff())
        if vm is not None:
            self.memo.vm_seen = True
        claimed = bool(v.status.get("claimedFrom")) and vm_name != self.name
        template = await self._template(v)
        if template is None:
            raise await self._fail(
                v, contract.REASON_TEMPLATE_NOT_FOUND, f"template {v.spec.get('template')!r} does not exist"
            )
        if vm is None and (
            self.memo.vm_seen or v.status.get("phase") in (contract.PHASE_RUNNING, contract.PHASE_PAUSED) or claimed
        ):
            raise await self._fail(v, contract.REASON_VM_GONE, f"VirtualMachine {vm_name} was deleted")
        if claimed:
            await self._adopt_dependents(v, vm_name)
        else:
            await self._ensure_secret(v, vm_name)
            await self._ensure_network_policy(v, vm_name)
            if vm is None:
                if v.spec.get("sourceSnapshot"):
                    await self._restore(v, vm_name)
                elif not self.memo.vm_written:
                    await self._create_vm(v, vm_name)
        if "status" not in self.memo.ensured:
            await self._status(
                v,
                {
                    "phase": v.status.get("phase")
                    if v.status.get("phase") in (contract.PHASE_RUNNING, contract.PHASE_PAUSED)
                    else contract.PHASE_STARTING,
                    "vmName": vm_name,
                    "agentSecret": contract.secret_name(vm_name),
                    "agentServerName": contract.agent_server_name(vm_name),
                    "expiry": v.spec["deadline"],
                    "reason": None,
                    "message": None,
                },
            )
            self.memo.ensured.add("status")

    async def _ensure_secret(self, v: View, vm_name: str) -> None:
        if self.memo.secret is not None:
            return
        labels = self._labels(v, vm_name)
        body = manifests.secret(
            vm_name,
            self.ns,
            owner=self._owner(v),
            labels=labels,
            port=self._port(),
            instance_id=self.name,
            shape=manifests.Shape.of(v.spec),
        )
        body["metadata"]["annotations"] = {contract.ANNOTATION_WRITTEN_BY: self.state.settings.operator_id}
        secret, _ = await self.kube.create(path("", "v1", "secrets", self.ns), body)
        self.memo.secret = secret

    async def _ensure_network_policy(self, v: View, vm_name: str) -> None:
        if "netpol" in self.memo.ensured:
            return
        body = manifests.network_policy(
            vm_name,
            self.ns,
            owner=self._owner(v),
            labels=self._labels(v, vm_name),
            port=self._port(),
            network=v.spec.get("network"),
        )
        await self.kube.create(path("networking.k8s.io", "v1", "networkpolicies", self.ns), body)
        self.memo.ensured.add("netpol")

    async def _create_vm(self, v: View, vm_name: str) -> None:
        assert self.memo.template is not None
        body = manifests.virtual_machine(
            vm_name,
            self.ns,
            template=self.memo.template,
            shape=manifests.Shape.of(v.spec),
            owner=self._owner(v),
            labels=self._labels(v, vm_name),
            annotations=self._annotations(v),
        )
        vm, created = await self.kube.create(self._url(*VM_URL), body)
        if (
            not created
            and (vm.get("metadata", {}).get("annotations") or {}).get(contract.ANNOTATION_INSTANCE_UID) != v.meta["uid"]
        ):
            return  # someone else's: the next pass sees it in the index and waits
        if created:
            self.log.info("instance %s: VirtualMachine %s written", self.name, vm_name)
        # Until the watch brings it into the index, later passes must not write it again.
        self.memo.vm_written = True

    async def _adopt_dependents(self, v: View, vm_name: str) -> None:
        """After a claim: the member's Secret and NetworkPolicy become the instance's."""
        if "adopted" in self.memo.ensured:
            return
        labels = self._labels(v, vm_name)
        meta = {
            "labels": {**labels, contract.LABEL_POOL: None, contract.LABEL_POOL_STATE: None},
            "ownerReferences": [self._owner(v)],
        }
        policy = manifests.network_policy(
            vm_name, self.ns, owner=self._owner(v), labels=labels, port=self._port(), network=v.spec.get("network")
        )
        # Both at once: the claim's latency is a few round trips, not a few per object.
        secret, _ = await asyncio.gather(
            self.kube.patch(path("", "v1", "secrets", self.ns, contract.secret_name(vm_name)), {"metadata": meta}),
            self.kube.patch(
                path("networking.k8s.io", "v1", "networkpolicies", self.ns, vm_name),
                {"metadata": meta, "spec": policy["spec"]},
            ),
        )
        self.memo.secret = secret
        self.memo.ensured.add("adopted")

    async def _restore(self, v: View, vm_name: str) -> None:
        """Restore the snapshot into this instance's new VM (raises Stop while waiting)."""
        restore_name = f"{self.name}-restore"
        restore_url = self._url(
            contract.SNAPSHOT_GROUP, contract.SNAPSHOT_VERSION, contract.VM_RESTORE_PLURAL, restore_name
        )
        existing = await self.kube.get(restore_url)
        if existing is not None:
            for c in existing.get("status", {}).get("conditions") or []:
                if c.get("type") == "Ready" and c.get("status") == "False" and c.get("reason") == "Error":
                    raise await self._fail(
                        v, contract.REASON_RESTORE_FAILED, str(c.get("message", "the restore failed"))
                    )
            raise Stop(None)  # KubeVirt is creating the VM; its event wakes us
        snap = await self.kube.get(
            self._url(contract.GROUP, contract.VERSION, contract.SNAPSHOT_PLURAL, str(v.spec["sourceSnapshot"]))
        )
        if snap is None or (snap.get("spec") or {}).get("tenant") != v.spec.get("tenant"):
            raise await self._fail(
                v, contract.REASON_SNAPSHOT_NOT_FOUND, f"snapshot {v.spec['sourceSnapshot']!r} does not exist"
            )
        snap_phase = (snap.get("status") or {}).get("phase")
        if snap_phase == contract.SNAPSHOT_PHASE_FAILED:
            raise await self._fail(
                v, contract.REASON_SNAPSHOT_NOT_READY, f"snapshot {v.spec['sourceSnapshot']!r} failed"
            )
        if snap_phase != contract.SNAPSHOT_PHASE_READY:
            await self._status(
                v,
                {
                    "phase": contract.PHASE_PENDING,
                    "reason": contract.REASON_SNAPSHOT_NOT_READY,
                    "message": "waiting for the snapshot",
                },
            )
            raise Stop(self._backoff())
        vm_snapshot_name = str(snap["status"]["vmSnapshotName"])
        vm_snapshot = await self.kube.get(
            self._url(contract.SNAPSHOT_GROUP, contract.SNAPSHOT_VERSION, contract.VM_SNAPSHOT_PLURAL, vm_snapshot_name)
        )
        content_name = ((vm_snapshot or {}).get("status") or {}).get("virtualMachineSnapshotContentName")
        content = (
            await self.kube.get(
                self._url(
                    contract.SNAPSHOT_GROUP,
                    contract.SNAPSHOT_VERSION,
                    contract.VM_SNAPSHOT_CONTENT_PLURAL,
                    content_name,
                )
            )
            if content_name
            else None
        )
        if content is None:
            raise await self._fail(v, contract.REASON_SNAPSHOT_NOT_FOUND, "the snapshot's content is gone")
        volumes = content["spec"]["source"]["virtualMachine"]["spec"]["template"]["spec"].get("volumes") or []
        index = next((i for i, vol in enumerate(volumes) if "cloudInitNoCloud" in vol), -1)
        if index < 0:
            raise await self._fail(v, contract.REASON_SNAPSHOT_NOT_READY, "the snapshot's VM has no cloud-init volume")
        labels = self._labels(v, vm_name)
        body = manifests.vm_restore(
            restore_name,
            self.ns,
            snapshot_name=vm_snapshot_name,
            vm_name=vm_name,
            owner=self._owner(v),
            labels=labels,
            vm_labels=labels,
            vm_annotations=self._annotations(v),
            pod_labels=manifests.pod_labels(labels),
            cloud_init_volume_index=index,
        )
        await self.kube.create(
            self._url(contract.SNAPSHOT_GROUP, contract.SNAPSHOT_VERSION, contract.VM_RESTORE_PLURAL), body
        )
        self.log.info("instance %s: restoring %s into VirtualMachine %s", self.name, vm_snapshot_name, vm_name)
        await self._status(
            v, {"restoredFrom": vm_snapshot_name, "phase": contract.PHASE_STARTING, "reason": None, "message": None}
        )
        raise Stop(None)

    # -- what runs ---------------------------------------------------------------------------------

    async def _mirror(self, v: View, vm_name: str, *, paused_by_deadline: bool) -> float | None:
        vmi = one(v.vmis, (self.ns, vm_name))
        gen = int(v.meta.get("generation", 0))
        prev = {c.get("type"): c for c in v.status.get("conditions") or []}
        want_paused = bool(v.spec.get("paused")) or paused_by_deadline
        retry: float | None = None
        vmi_phase = vmi["phase"] if vmi else None
        ip = vmi["ip"] if vmi else None
        running = vmi is not None and vmi_phase == "Running" and not vmi["deleting"]
        paused = bool(vmi and vmi["paused"])
        if vmi is not None and vmi_phase in ("Failed", "Succeeded"):
            await self._delete_vm(v, vm_name)
            raise await self._fail(
                v, contract.REASON_VMI_FAILED, f"the VM stopped ({vmi_phase}): {vmi.get('reason') or 'no reason given'}"
            )

        # Pause / unpause through KubeVirt's subresources.
        if running and want_paused != paused and self.memo.pause_sent is not want_paused:
            verb = "pause" if want_paused else "unpause"
            try:
                await self.kube.put(
                    path(
                        contract.SUBRESOURCES_GROUP,
                        contract.KUBEVIRT_VERSION,
                        contract.VMI_PLURAL,
                        self.ns,
                        vm_name,
                        verb,
                    ),
                    {},
                )
                self.memo.pause_sent = want_paused
                self.log.info("instance %s: %s", self.name, verb)
            except KubeError as e:
                if e.status != 409:
                    raise
                retry = self._backoff()
        if paused == want_paused:
            self.memo.pause_sent = None

        endpoint_target = f"{ip}:{self._port()}" if ip else ""
        agent_ok = bool(running and vmi and self.memo.agent_ok == (vmi["uid"], endpoint_target))
        message = ""
        if running and not paused and not agent_ok and ip:
            ok, message = await self._check_agent(v, vm_name, endpoint_target)
            if ok:
                assert vmi is not None
                self.memo.agent_ok = (vmi["uid"], endpoint_target)
                self.memo.retry = 0.05
                agent_ok = True
            else:
                retry = self._backoff()
        if paused and self.memo.agent_ok and vmi and self.memo.agent_ok[0] == vmi["uid"]:
            agent_ok = True  # it answered before the pause; a frozen agent cannot answer now

        if paused:
            phase = contract.PHASE_PAUSED
        elif agent_ok:
            phase = contract.PHASE_RUNNING
        else:
            phase = contract.PHASE_STARTING
        reason = contract.REASON_DEADLINE_REACHED if paused and paused_by_deadline else None
        conditions = [
            condition(
                contract.CONDITION_VM_READY,
                running,
                vmi_phase or "NoVirtualMachineInstance",
                "",
                prev.get(contract.CONDITION_VM_READY),
                gen,
            ),
            condition(
                contract.CONDITION_AGENT_READY,
                agent_ok,
                "Answered" if agent_ok else "NotAnswering",
                "" if agent_ok else message,
                prev.get(contract.CONDITION_AGENT_READY),
                gen,
            ),
            condition(
                contract.CONDITION_PAUSED,
                paused,
                "PausedByUser" if paused and not paused_by_deadline else (reason or "NotPaused"),
                "",
                prev.get(contract.CONDITION_PAUSED),
                gen,
            ),
        ]
        if contract.CONDITION_WARM_POOL_CLAIMED in prev:
            conditions.append(prev[contract.CONDITION_WARM_POOL_CLAIMED])
        await self._status(
            v,
            {
                "phase": phase,
                "vmName": vm_name,
                "vmiPhase": vmi_phase,
                "ip": ip,
                "agentEndpoint": endpoint_target if agent_ok else None,
                "expiry": v.spec["deadline"],
                "reason": reason,
                "message": None,
                "conditions": conditions,
            },
        )
        return retry

    async def _check_agent(self, v: View, vm_name: str, target: str) -> tuple[bool, str]:
        secret = self.memo.secret
        if secret is None or secret.get("metadata", {}).get("name") != contract.secret_name(vm_name):
            secret = await self.kube.get(path("", "v1", "secrets", self.ns, contract.secret_name(vm_name)))
            if secret is None:
                return False, "the agent's Secret is missing"
            self.memo.secret = secret
        data = secret.get("data") or {}
        endpoint = AgentEndpoint(
            target=target,
            token=base64.b64decode(data.get(contract.SECRET_KEY_TOKEN, "")).decode(),
            ca_pem=base64.b64decode(data.get(contract.SECRET_KEY_CA, "")).decode(),
            server_name=contract.agent_server_name(vm_name),
        )
        timeout = self.state.settings.agent_timeout
        try:
            bound = await agent.probe(endpoint, timeout)
            if bound not in ("", self.name):
                raise await self._fail(v, contract.REASON_AGENT_REFUSED, "the VM's agent serves another instance")
            env = await self._env(v)
            await agent.bind(endpoint, self.name, env, timeout)
        except agent.AgentNotReady as e:
            return False, str(e)
        except agent.AgentRefused as e:
            raise await self._fail(v, contract.REASON_AGENT_REFUSED, str(e)) from None
        self.log.info("instance %s: agent answers at %s", self.name, target)
        return True, ""

    async def _env(self, v: View) -> dict[str, str]:
        name = v.spec.get("envSecret")
        if not name:
            return {}
        url = path("", "v1", "secrets", self.ns, str(name))
        secret = await self.kube.get(url)
        if secret is None:
            return {}
        refs = secret.get("metadata", {}).get("ownerReferences") or []
        if not any(r.get("uid") == v.meta["uid"] for r in refs):
            await self.kube.patch(
                url, {"metadata": {"ownerReferences": [*refs, self._owner(v) | {"controller": False}]}}
            )
        return {k: base64.b64decode(val).decode() for k, val in (secret.get("data") or {}).items()}

    # -- deletion ----------------------------------------------------------------------------------

    async def finalize(self, v: View) -> bool:
        """The instance is being deleted: remove its VM and what belongs to it; True once the VM is gone."""
        await self._status(v, {"phase": contract.PHASE_TERMINATING})
        names = {str(v.status.get("vmName") or self.name)}
        mine = one(v.vm_owners, v.meta["uid"])
        if mine:
            names.add(str(mine))
        gone = True
        for vm_name in names:
            if vm_name not in self.memo.deleted:  # one delete each; later passes only wait
                await self._delete_vm(v, vm_name)
                self.memo.deleted.add(vm_name)
            vm = one(v.vms, (self.ns, vm_name))
            if vm is not None and vm["instance_uid"] == v.meta["uid"]:
                gone = False
        return gone
