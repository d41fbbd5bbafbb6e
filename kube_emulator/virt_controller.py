"""A stand-in for KubeVirt's controllers (virt-controller, virt-handler, CDI) against the emulator.

It does to the API objects what KubeVirt does, in the same order and with the same shapes
(kubevirt.io/v1, snapshot.kubevirt.io/v1beta1, cdi.kubevirt.io/v1beta1):

- a VirtualMachine that should run (runStrategy Always/RerunOnFailure/Once, or running: true) gets
  its DataVolumes (from spec.dataVolumeTemplates, owned by the VM, phase Succeeded) and a
  VirtualMachineInstance of the same name (owned by the VM, with virt-controller's finalizer),
  which moves Pending -> Scheduling -> Scheduled -> Running; Running carries an interface with the
  address the guest got, nodeName and the Ready condition; the VM's status follows
  (created/ready/printableStatus, Ready condition).
- a VM that should not run (Halted) or is being deleted loses its VMI; a VMI being deleted is
  shut down (the guest stops) and then released (finalizer removed); a deleted VM waits for that.
- pause/unpause go through the emulator's subresources.kubevirt.io endpoints (kube_emulator.kubevirt),
  which set the VMI's Paused condition; this controller then freezes or thaws the guest.
- a VirtualMachineSnapshot of an existing VM becomes InProgress, then a
  VirtualMachineSnapshotContent holding the VM's spec is written and the snapshot is Succeeded
  and readyToUse; a VirtualMachineRestore whose target VM does not exist creates it from the
  content with the restore's JSON patches applied, and completes.

What runs "inside" a VM is a `Guest`: `kube_emulator.guest.AgentGuests` boots a real guest agent
on a loopback address from the VM's cloud-init Secret; without one, VMs get addresses where
nothing listens. Each step happens after `step_seconds`, so watchers see every phase.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

import jsonpatch

from kube_emulator.emulator import ApiError, Emulator, Obj

log = logging.getLogger(__name__)

VM = "kubevirt.io/v1/virtualmachines"
VMI = "kubevirt.io/v1/virtualmachineinstances"
DV = "cdi.kubevirt.io/v1beta1/datavolumes"
SNAP = "snapshot.kubevirt.io/v1beta1/virtualmachinesnapshots"
CONTENT = "snapshot.kubevirt.io/v1beta1/virtualmachinesnapshotcontents"
RESTORE = "snapshot.kubevirt.io/v1beta1/virtualmachinerestores"
SECRET = "/v1/secrets"
VMI_FINALIZER = "kubevirt.io/virtualMachineControllerFinalize"
VM_FINALIZER = "kubevirt.io/virtualMachineControllerFinalize"
RUNNING_STRATEGIES = ("Always", "RerunOnFailure", "Once")


class Guest(Protocol):
    """What runs inside the VMs: booted when a VMI runs, stopped when it goes."""

    async def boot(self, vmi: Obj, cloud_init_secret: Obj | None, restored_from: str | None) -> str:
        """Start the guest of `vmi`; returns its address."""
        ...

    async def shutdown(self, namespace: str, name: str) -> None: ...

    async def pause(self, namespace: str, name: str) -> None: ...

    async def unpause(self, namespace: str, name: str) -> None: ...

    async def snapshot(self, namespace: str, name: str, content: str) -> int:
        """Keep a copy of the VM's disk under `content`; returns its size in bytes."""
        ...


class _NoGuest:
    """VMs with nothing inside: addresses from 127.99.0.0/16 where nobody listens."""

    def __init__(self) -> None:
        self._next = 1

    async def boot(self, vmi: Obj, cloud_init_secret: Obj | None, restored_from: str | None) -> str:
        self._next += 1
        return str(ipaddress.ip_address("127.99.0.0") + self._next)

    async def shutdown(self, namespace: str, name: str) -> None:
        return None

    async def pause(self, namespace: str, name: str) -> None:
        return None

    async def unpause(self, namespace: str, name: str) -> None:
        return None

    async def snapshot(self, namespace: str, name: str, content: str) -> int:
        return 0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owner(obj: Obj, *, controller: bool = True) -> Obj:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def _condition(type_: str, status: bool, reason: str = "", message: str = "") -> Obj:
    return {
        "type": type_,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastProbeTime": None,
        "lastTransitionTime": _now(),
    }


def _should_run(vm: Obj) -> bool:
    spec = vm.get("spec", {})
    if "runStrategy" in spec:
        return spec["runStrategy"] in RUNNING_STRATEGIES
    return bool(spec.get("running"))


def _paused(vmi: Obj | None) -> bool:
    return any(
        c.get("type") == "Paused" and c.get("status") == "True"
        for c in (vmi or {}).get("status", {}).get("conditions") or []
    )


class VirtController:
    """Install on an emulator (same loop): `VirtController(em, guest).start()`; `stop()` to detach."""

    def __init__(self, em: Emulator, guest: Guest | None = None, *, step_seconds: float = 0.005) -> None:
        self.em = em
        self.guest: Guest = guest or _NoGuest()
        self.step_seconds = step_seconds
        self._tasks: set[asyncio.Task[None]] = set()
        self._booting: set[tuple[str, str]] = set()
        self._restored_from: dict[tuple[str, str], str] = {}
        self._listeners: list[tuple[str, Callable[[str, Obj, Obj | None], None]]] = []
        # VMs whose VMI a test holds in Scheduling (e.g. to see the operator wait), by (namespace, name).
        self.held: set[tuple[str, str]] = set()
        self._release = asyncio.Event()

    def start(self) -> VirtController:
        for key, fn in (
            (VM, self._on_vm),
            (VMI, self._on_vmi),
            (SNAP, self._on_snapshot),
            (RESTORE, self._on_restore),
        ):
            self.em.listeners[key].append(fn)
            self._listeners.append((key, fn))
        # Objects written before we started are handled as if just seen.
        for vm in list(self.em.list_objects(VM)):
            self._on_vm("ADDED", vm, None)
        return self

    def stop(self) -> None:
        for key, fn in self._listeners:
            self.em.listeners[key].remove(fn)
        self._listeners.clear()
        for task in self._tasks:
            task.cancel()

    def release(self, namespace: str, name: str) -> None:
        """Let a held VMI go on to Running."""
        self.held.discard((namespace, name))
        self._release.set()

    def fail(self, namespace: str, name: str, reason: str = "guest crashed") -> None:
        """Make a running VMI Failed, as when the guest dies or its node goes."""
        vmi = self.em.get_object(VMI, name, namespace)
        if vmi is not None:
            self.em.patch_object(
                VMI,
                name,
                {
                    "status": {
                        "phase": "Failed",
                        "reason": reason,
                        "conditions": [_condition("Ready", False, "Failed", reason)],
                    }
                },
                namespace,
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("virt-controller stand-in step failed", exc_info=t.exception())

        task.add_done_callback(done)

    # -- VirtualMachine ----------------------------------------------------------------------------

    def _on_vm(self, kind: str, vm: Obj, old: Obj | None) -> None:
        meta = vm["metadata"]
        ns, name = meta.get("namespace", ""), meta["name"]
        if kind == "DELETED":
            return
        current = self.em.get_object(VM, name, ns)
        if current is None or current["metadata"]["uid"] != meta["uid"]:
            return
        vm = current
        if meta.get("deletionTimestamp"):
            self._spawn(self._finalize_vm(ns, name))
            return
        if VM_FINALIZER not in (meta.get("finalizers") or []):
            self.em.patch_object(
                VM, name, {"metadata": {"finalizers": [*(meta.get("finalizers") or []), VM_FINALIZER]}}, ns
            )
            return
        vmi = self.em.get_object(VMI, name, ns)
        if _should_run(vm):
            if vmi is None:
                self._spawn(self._start(ns, name, meta["uid"]))
        elif vmi is not None and not vmi["metadata"].get("deletionTimestamp"):
            self.em.delete_object(VMI, name, ns)

    async def _finalize_vm(self, ns: str, name: str) -> None:
        vmi = self.em.get_object(VMI, name, ns)
        if vmi is not None:
            if not vmi["metadata"].get("deletionTimestamp"):
                self.em.delete_object(VMI, name, ns)
            return  # the VMI's removal comes back here through _on_vmi
        vm = self.em.get_object(VM, name, ns)
        if vm is not None and VM_FINALIZER in (vm["metadata"].get("finalizers") or []):
            kept = [f for f in vm["metadata"]["finalizers"] if f != VM_FINALIZER]
            self.em.patch_object(VM, name, {"metadata": {"finalizers": kept or None}}, ns)

    async def _start(self, ns: str, name: str, vm_uid: str) -> None:
        if (ns, name) in self._booting:
            return
        self._booting.add((ns, name))
        try:
            vm = self.em.get_object(VM, name, ns)
            if vm is None or vm["metadata"]["uid"] != vm_uid or self.em.get_object(VMI, name, ns) is not None:
                return
            for tmpl in vm.get("spec", {}).get("dataVolumeTemplates") or []:
                dv_name = tmpl["metadata"]["name"]
                existing = self.em.get_object(DV, dv_name, ns)
                if existing is not None and existing["metadata"].get("ownerReferences", [{}])[0].get("uid") != vm_uid:
                    log.warning("DataVolume %s/%s belongs to another VM", ns, dv_name)
                if existing is None:
                    self.em.put_object(
                        DV,
                        {
                            "metadata": {
                                **copy.deepcopy(tmpl.get("metadata", {})),
                                "namespace": ns,
                                "ownerReferences": [_owner(vm)],
                            },
                            "spec": copy.deepcopy(tmpl.get("spec", {})),
                            "status": {"phase": "Succeeded", "progress": "100.0%"},
                        },
                    )
            template = vm.get("spec", {}).get("template", {})
            vmi = self.em.put_object(
                VMI,
                {
                    "metadata": {
                        "name": name,
                        "namespace": ns,
                        "labels": {
                            **(template.get("metadata", {}).get("labels") or {}),
                            "kubevirt.io/created-by": vm_uid,
                        },
                        "annotations": dict(template.get("metadata", {}).get("annotations") or {}),
                        "ownerReferences": [_owner(vm)],
                        "finalizers": [VMI_FINALIZER, "foregroundDeleteVirtualMachine"],
                    },
                    "spec": copy.deepcopy(template.get("spec", {})),
                    "status": {"phase": "Pending"},
                },
            )
            uid = vmi["metadata"]["uid"]
            self._vm_status(ns, name, "Starting", False)
            for phase in ("Scheduling", "Scheduled"):
                await asyncio.sleep(self.step_seconds)
                if not self._same(ns, name, uid):
                    return
                self.em.patch_object(VMI, name, {"status": {"phase": phase}}, ns)
            while (ns, name) in self.held:
                self._release.clear()
                await self._release.wait()
            await asyncio.sleep(self.step_seconds)
            if not self._same(ns, name, uid):
                return
            current = self.em.get_object(VMI, name, ns)
            assert current is not None
            address = await self.guest.boot(
                current, self._cloud_init_secret(current), self._restored_from.get((ns, name))
            )
            if not self._same(ns, name, uid):
                await self.guest.shutdown(ns, name)
                return
            self.em.patch_object(
                VMI,
                name,
                {
                    "status": {
                        "phase": "Running",
                        "nodeName": "emulated-node",
                        "interfaces": [
                            {
                                "name": "default",
                                "interfaceName": "eth0",
                                "ipAddress": address,
                                "ipAddresses": [address],
                                "infoSource": "domain, guest-agent",
                            }
                        ],
                        "conditions": [_condition("Ready", True), _condition("AgentConnected", True)],
                    }
                },
                ns,
            )
        finally:
            self._booting.discard((ns, name))

    def _same(self, ns: str, name: str, uid: str) -> bool:
        vmi = self.em.get_object(VMI, name, ns)
        return vmi is not None and vmi["metadata"]["uid"] == uid and not vmi["metadata"].get("deletionTimestamp")

    def _cloud_init_secret(self, vmi: Obj) -> Obj | None:
        ns = vmi["metadata"]["namespace"]
        for volume in vmi.get("spec", {}).get("volumes") or []:
            for source in ("cloudInitNoCloud", "cloudInitConfigDrive"):
                ref = (volume.get(source) or {}).get("secretRef") or (volume.get(source) or {}).get("userDataSecretRef")
                if ref and ref.get("name"):
                    return self.em.get_object(SECRET, ref["name"], ns)
        return None

    def _vm_status(self, ns: str, name: str, printable: str, ready: bool) -> None:
        vm = self.em.get_object(VM, name, ns)
        if vm is None:
            return
        self.em.patch_object(
            VM,
            name,
            {
                "status": {
                    "created": printable not in ("Stopped",),
                    "ready": ready,
                    "printableStatus": printable,
                    "conditions": [_condition("Ready", ready)],
                }
            },
            ns,
            subresource="status",
        )

    # -- VirtualMachineInstance --------------------------------------------------------------------

    def _on_vmi(self, kind: str, vmi: Obj, old: Obj | None) -> None:
        meta = vmi["metadata"]
        ns, name = meta.get("namespace", ""), meta["name"]
        if kind == "DELETED":
            self._vm_status(ns, name, "Stopped", False)
            vm = self.em.get_object(VM, name, ns)
            if vm is not None:
                if vm["metadata"].get("deletionTimestamp"):
                    self._spawn(self._finalize_vm(ns, name))
                elif _should_run(vm) and vm["spec"].get("runStrategy") != "Once":
                    self._on_vm("MODIFIED", vm, None)  # restart, as virt-controller does
            return
        if meta.get("deletionTimestamp"):
            self._spawn(self._shutdown(ns, name, meta["uid"]))
            return
        was, now = _paused(old), _paused(vmi)
        if now and not was:
            self._spawn(self.guest.pause(ns, name))
            self._vm_status(ns, name, "Paused", False)
        elif was and not now:
            self._spawn(self.guest.unpause(ns, name))
            self._vm_status(ns, name, "Running", True)
        elif (
            vmi.get("status", {}).get("phase") == "Running" and (old or {}).get("status", {}).get("phase") != "Running"
        ):
            self._vm_status(ns, name, "Running", True)
        elif vmi.get("status", {}).get("phase") == "Failed" and (old or {}).get("status", {}).get("phase") != "Failed":
            self._spawn(self.guest.shutdown(ns, name))
            self._vm_status(ns, name, "CrashLoopBackOff", False)

    async def _shutdown(self, ns: str, name: str, uid: str) -> None:
        await self.guest.shutdown(ns, name)
        vmi = self.em.get_object(VMI, name, ns)
        if vmi is None or vmi["metadata"]["uid"] != uid:
            return
        kept = [
            f
            for f in vmi["metadata"].get("finalizers") or []
            if f not in (VMI_FINALIZER, "foregroundDeleteVirtualMachine")
        ]
        self.em.patch_object(VMI, name, {"metadata": {"finalizers": kept or None}}, ns)

    # -- snapshots and restores ----------------------------------------------------------------------

    def _on_snapshot(self, kind: str, snap: Obj, old: Obj | None) -> None:
        if kind == "ADDED" and not snap.get("status"):
            self._spawn(self._take_snapshot(snap["metadata"]["namespace"], snap["metadata"]["name"]))

    async def _take_snapshot(self, ns: str, name: str) -> None:
        await asyncio.sleep(self.step_seconds)
        snap = self.em.get_object(SNAP, name, ns)
        if snap is None:
            return
        source = snap.get("spec", {}).get("source", {})
        vm = self.em.get_object(VM, source.get("name", ""), ns) if source.get("kind") == "VirtualMachine" else None
        if vm is None:
            self.em.patch_object(
                SNAP,
                name,
                {
                    "status": {
                        "phase": "Failed",
                        "readyToUse": False,
                        "error": {"message": f"source {source.get('name')!r} does not exist", "time": _now()},
                        "conditions": [_condition("Ready", False, "Error", "Source does not exist")],
                    }
                },
                ns,
                subresource="status",
            )
            return
        self.em.patch_object(
            SNAP,
            name,
            {
                "status": {
                    "phase": "InProgress",
                    "readyToUse": False,
                    "sourceUID": vm["metadata"]["uid"],
                    "conditions": [_condition("Progressing", True, "InProgress"), _condition("Ready", False)],
                }
            },
            ns,
            subresource="status",
        )
        content_name = f"vmsnapshot-content-{snap['metadata']['uid']}"
        await self.guest.snapshot(ns, vm["metadata"]["name"], content_name)
        vm_meta = vm["metadata"]
        templates = {
            t["metadata"]["name"]: (t.get("spec") or {}).get("storage") or (t.get("spec") or {}).get("pvc") or {}
            for t in vm.get("spec", {}).get("dataVolumeTemplates") or []
        }
        volume_names = [
            v["name"]
            for v in vm.get("spec", {}).get("template", {}).get("spec", {}).get("volumes") or []
            if "dataVolume" in v
        ]
        content = self.em.put_object(
            CONTENT,
            {
                "metadata": {"name": content_name, "namespace": ns, "ownerReferences": [_owner(snap)]},
                "spec": {
                    "virtualMachineSnapshotName": name,
                    "source": {
                        "virtualMachine": {
                            "metadata": {
                                "name": vm_meta["name"],
                                "namespace": ns,
                                "labels": dict(vm_meta.get("labels") or {}),
                                "annotations": dict(vm_meta.get("annotations") or {}),
                            },
                            "spec": copy.deepcopy(vm.get("spec", {})),
                        }
                    },
                    "volumeBackups": [
                        {
                            "volumeName": v["name"],
                            "volumeSnapshotName": f"vmsnapshot-{snap['metadata']['uid']}-volume-{v['name']}",
                            "persistentVolumeClaim": {
                                "metadata": {"name": v["dataVolume"]["name"]},
                                "spec": {
                                    "resources": (templates.get(v["dataVolume"]["name"]) or {}).get("resources", {})
                                },
                            },
                        }
                        for v in vm.get("spec", {}).get("template", {}).get("spec", {}).get("volumes") or []
                        if "dataVolume" in v
                    ],
                },
                "status": {
                    "readyToUse": True,
                    "creationTime": _now(),
                    "volumeSnapshotStatus": [
                        {"volumeSnapshotName": f"vmsnapshot-{snap['metadata']['uid']}-volume-{v}", "readyToUse": True}
                        for v in volume_names
                    ],
                },
            },
        )
        await asyncio.sleep(self.step_seconds)
        if self.em.get_object(SNAP, name, ns) is None:
            return
        self.em.patch_object(
            SNAP,
            name,
            {
                "status": {
                    "phase": "Succeeded",
                    "readyToUse": True,
                    "creationTime": content["status"]["creationTime"],
                    "virtualMachineSnapshotContentName": content_name,
                    "indications": ["Online", "GuestAgent"],
                    "conditions": [
                        _condition("Progressing", False, "Operation complete"),
                        _condition("Ready", True, "Operation complete"),
                    ],
                }
            },
            ns,
            subresource="status",
        )

    def _on_restore(self, kind: str, restore: Obj, old: Obj | None) -> None:
        if kind == "ADDED" and not restore.get("status"):
            self._spawn(self._restore(restore["metadata"]["namespace"], restore["metadata"]["name"]))

    async def _restore(self, ns: str, name: str) -> None:
        await asyncio.sleep(self.step_seconds)
        restore = self.em.get_object(RESTORE, name, ns)
        if restore is None:
            return
        spec = restore.get("spec", {})

        def fail(message: str) -> None:
            self.em.patch_object(
                RESTORE,
                name,
                {
                    "status": {
                        "complete": False,
                        "conditions": [
                            _condition("Ready", False, "Error", message),
                            _condition("Progressing", False, "Error", message),
                        ],
                    }
                },
                ns,
                subresource="status",
            )

        snap = self.em.get_object(SNAP, spec.get("virtualMachineSnapshotName", ""), ns)
        if snap is None or not snap.get("status", {}).get("readyToUse"):
            fail("VirtualMachineSnapshot is not ready")
            return
        content = self.em.get_object(CONTENT, snap["status"]["virtualMachineSnapshotContentName"], ns)
        if content is None:
            fail("VirtualMachineSnapshotContent does not exist")
            return
        target = spec.get("target", {}).get("name", "")
        existing = self.em.get_object(VM, target, ns)
        if existing is not None and self.em.get_object(VMI, target, ns) is not None:
            fail(f"VirtualMachine {target!r} is running: stop it to restore into it")
            return
        if existing is None:
            source = copy.deepcopy(content["spec"]["source"]["virtualMachine"])
            source["metadata"]["name"] = target
            source = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", **source}
            # The restored volumes are new DataVolumes, named as KubeVirt names them.
            renames = {
                t["metadata"]["name"]: f"restore-{restore['metadata']['uid']}-{t['metadata']['name']}"
                for t in source["spec"].get("dataVolumeTemplates") or []
            }
            for t in source["spec"].get("dataVolumeTemplates") or []:
                t["metadata"]["name"] = renames[t["metadata"]["name"]]
            for v in source["spec"].get("template", {}).get("spec", {}).get("volumes") or []:
                if "dataVolume" in v and v["dataVolume"].get("name") in renames:
                    v["dataVolume"]["name"] = renames[v["dataVolume"]["name"]]
            try:
                ops = [json.loads(p) for p in spec.get("patches") or []]
                source = jsonpatch.apply_patch(source, ops)
            except (ValueError, jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                fail(f"cannot apply patches: {e}")
                return
            source["metadata"]["namespace"] = ns
            # Restored DataVolumes get new names, as KubeVirt's restore-<uid>-<volume> names do.
            self._restored_from[(ns, source["metadata"]["name"])] = content["metadata"]["name"]
            try:
                self.em.put_object(VM, source)
            except ApiError as e:
                fail(e.message)
                return
        else:
            self._restored_from[(ns, target)] = content["metadata"]["name"]
        self.em.patch_object(
            RESTORE,
            name,
            {
                "status": {
                    "complete": True,
                    "restoreTime": _now(),
                    "conditions": [
                        _condition("Progressing", False, "Operation complete"),
                        _condition("Ready", True, "Operation complete"),
                    ],
                }
            },
            ns,
            subresource="status",
        )
