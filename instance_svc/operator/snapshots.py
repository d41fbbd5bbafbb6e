"""The reconciler of a CyberdeskSnapshot: a VirtualMachineSnapshot of the instance's VM, mirrored."""

from __future__ import annotations

import logging
import re
from typing import Any

from instance_svc.operator import contract, manifests
from instance_svc.operator.state import OperatorState, now, rfc3339

Obj = dict[str, Any]

_QUANTITY = re.compile(r"^(\d+)([KMGT]i?)?$")
_UNITS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity: Any) -> int:
    m = _QUANTITY.match(str(quantity or "0"))
    return int(m[1]) * _UNITS[m[2]] if m else 0


class SnapshotReconciler:
    def __init__(
        self, state: OperatorState, namespace: str, name: str, log: logging.Logger | logging.LoggerAdapter[Any]
    ) -> None:
        self.state = state
        self.ns = namespace
        self.name = name
        self.log = log
        self.created = False

    def _url(self, group: str, version: str, plural: str, name: str = "", sub: str = "") -> str:
        from instance_svc.operator.kube import path

        return path(group, version, plural, self.ns, name, sub)

    async def _status(self, body: Any, patch: Obj) -> None:
        current = body.get("status") or {}
        if all(current.get(k) == v for k, v in patch.items()):
            return
        await self.state.kube.patch(
            self._url(contract.GROUP, contract.VERSION, contract.SNAPSHOT_PLURAL, self.name, "status"),
            {"status": patch},
        )

    async def reconcile(self, body: Any) -> float | None:
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        if status.get("phase") in (contract.SNAPSHOT_PHASE_READY, contract.SNAPSHOT_PHASE_FAILED):
            return None
        vm_snapshot_url = self._url(
            contract.SNAPSHOT_GROUP, contract.SNAPSHOT_VERSION, contract.VM_SNAPSHOT_PLURAL, self.name
        )
        vm_snapshot = (
            await self.state.kube.get(vm_snapshot_url) if (self.created or status.get("vmSnapshotName")) else None
        )
        if vm_snapshot is None:
            instance = await self.state.kube.get(
                self._url(contract.GROUP, contract.VERSION, contract.INSTANCE_PLURAL, str(spec.get("instance", "")))
            )
            inst_status = (instance or {}).get("status") or {}
            if instance is None or (instance.get("spec") or {}).get("tenant") != spec.get("tenant"):
                await self._fail(
                    body, contract.REASON_SOURCE_NOT_FOUND, f"instance {spec.get('instance')!r} does not exist"
                )
                return None
            if inst_status.get("phase") in contract.TERMINAL_PHASES:
                await self._fail(body, contract.REASON_SOURCE_NOT_FOUND, f"instance {spec.get('instance')!r} has ended")
                return None
            if inst_status.get("phase") not in (contract.PHASE_RUNNING, contract.PHASE_PAUSED) or not inst_status.get(
                "vmName"
            ):
                await self._status(body, {"phase": contract.SNAPSHOT_PHASE_PENDING})
                return self.state.settings.retry_max
            vm_name = str(inst_status["vmName"])
            owner = manifests.owner_ref(
                {"apiVersion": contract.API_VERSION, "kind": contract.SNAPSHOT_KIND, "metadata": body["metadata"]}
            )
            labels = {
                contract.LABEL_SNAPSHOT: self.name,
                contract.LABEL_INSTANCE: str(spec.get("instance", "")),
                contract.LABEL_TENANT: str(spec.get("tenant", "")),
                contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
            }
            vm_snapshot, _ = await self.state.kube.create(
                self._url(contract.SNAPSHOT_GROUP, contract.SNAPSHOT_VERSION, contract.VM_SNAPSHOT_PLURAL),
                manifests.vm_snapshot(self.name, self.ns, vm_name=vm_name, owner=owner, labels=labels),
            )
            self.created = True
            self.log.info("snapshot %s: VirtualMachineSnapshot of %s written", self.name, vm_name)
            res = (instance.get("spec") or {}).get("resources") or {}
            await self._status(
                body,
                {
                    "phase": contract.SNAPSHOT_PHASE_IN_PROGRESS,
                    "vmSnapshotName": self.name,
                    "sourceVM": vm_name,
                    "template": (instance.get("spec") or {}).get("template"),
                    "resources": {k: res[k] for k in ("vcpu", "memoryMiB", "diskMiB") if k in res},
                    "includesMemory": False,
                },
            )
        self.created = True
        vs = vm_snapshot.get("status") or {}
        if vs.get("readyToUse"):
            content = await self.state.kube.get(
                self._url(
                    contract.SNAPSHOT_GROUP,
                    contract.SNAPSHOT_VERSION,
                    contract.VM_SNAPSHOT_CONTENT_PLURAL,
                    str(vs.get("virtualMachineSnapshotContentName", "")),
                )
            )
            # The snapshotted disks' size (KubeVirt reports no used bytes): their storage requests.
            size = sum(
                _bytes(
                    ((b.get("persistentVolumeClaim") or {}).get("spec") or {})
                    .get("resources", {})
                    .get("requests", {})
                    .get("storage")
                )
                for b in ((content or {}).get("spec") or {}).get("volumeBackups") or []
            )
            await self._status(
                body,
                {
                    "phase": contract.SNAPSHOT_PHASE_READY,
                    "readyTime": vs.get("creationTime") or rfc3339(now()),
                    "sizeBytes": size,
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "Ready",
                            "message": "",
                            "lastTransitionTime": rfc3339(now()),
                        }
                    ],
                },
            )
            return None
        if vs.get("phase") == "Failed":
            message = str((vs.get("error") or {}).get("message") or "the VM snapshot failed")
            await self._fail(body, contract.REASON_SNAPSHOT_FAILED, message)
        return None

    async def _fail(self, body: Any, reason: str, message: str) -> None:
        self.log.warning("snapshot %s failed: %s", self.name, message)
        await self._status(body, {"phase": contract.SNAPSHOT_PHASE_FAILED, "reason": reason, "message": message})
