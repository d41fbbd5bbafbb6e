"""What KubeVirt's virt-api answers on its aggregated subresources (subresources.kubevirt.io/v1).

PUT .../virtualmachineinstances/<name>/pause and /unpause: virt-api refuses a VMI that does not
run (409 Conflict, "VMI is not running"), one already paused ("VMI is already paused") or not
paused ("VMI is not paused"); otherwise virt-handler freezes the domain and sets the VMI's
`Paused` condition (reason PausedByUser). Here that condition is written at once. VM start/stop/
restart set the VM's runStrategy / a restart request as virt-api does.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kube_emulator.emulator import Emulator, Obj, Resource

VMI = "kubevirt.io/v1/virtualmachineinstances"
VM = "kubevirt.io/v1/virtualmachines"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conflict(message: str) -> tuple[int, Obj]:
    from kube_emulator.emulator import ApiError

    return 409, ApiError(409, "Conflict", message).status()


def _vmi(em: Emulator, namespace: str, name: str) -> Obj | None:
    return em.get_object(VMI, name, namespace)


def _is_paused(vmi: Obj) -> bool:
    return any(
        c.get("type") == "Paused" and c.get("status") == "True" for c in vmi.get("status", {}).get("conditions") or []
    )


def pause(em: Emulator, res: Resource, namespace: str, name: str, body: Any) -> tuple[int, Obj]:
    from kube_emulator.emulator import ApiError

    vmi = _vmi(em, namespace, name)
    if vmi is None:
        return 404, ApiError(404, "NotFound", f'virtualmachineinstance.kubevirt.io "{name}" not found').status()
    if vmi.get("status", {}).get("phase") != "Running":
        return _conflict("VMI is not running")
    if _is_paused(vmi):
        return _conflict("VMI is already paused")
    conditions = [c for c in vmi.get("status", {}).get("conditions") or [] if c.get("type") != "Paused"]
    conditions.append(
        {
            "type": "Paused",
            "status": "True",
            "reason": "PausedByUser",
            "message": "VMI was paused by user",
            "lastProbeTime": None,
            "lastTransitionTime": _now(),
        }
    )
    em.patch_object(VMI, name, {"status": {"conditions": conditions}}, namespace)
    return 200, {}


def unpause(em: Emulator, res: Resource, namespace: str, name: str, body: Any) -> tuple[int, Obj]:
    from kube_emulator.emulator import ApiError

    vmi = _vmi(em, namespace, name)
    if vmi is None:
        return 404, ApiError(404, "NotFound", f'virtualmachineinstance.kubevirt.io "{name}" not found').status()
    if not _is_paused(vmi):
        return _conflict("VMI is not paused")
    conditions = [c for c in vmi.get("status", {}).get("conditions") or [] if c.get("type") != "Paused"]
    em.patch_object(VMI, name, {"status": {"conditions": conditions}}, namespace)
    return 200, {}


def _vm_run_strategy(strategy: str) -> Any:
    def handler(em: Emulator, res: Resource, namespace: str, name: str, body: Any) -> tuple[int, Obj]:
        from kube_emulator.emulator import ApiError

        vm = em.get_object(VM, name, namespace)
        if vm is None:
            return 404, ApiError(404, "NotFound", f'virtualmachine.kubevirt.io "{name}" not found').status()
        em.patch_object(VM, name, {"spec": {"runStrategy": strategy, "running": None}}, namespace)
        return 202, {}

    return handler


def install(em: Emulator) -> None:
    em.subresource_handlers[("subresources.kubevirt.io", "virtualmachineinstances", "pause")] = pause
    em.subresource_handlers[("subresources.kubevirt.io", "virtualmachineinstances", "unpause")] = unpause
    em.subresource_handlers[("subresources.kubevirt.io", "virtualmachines", "start")] = _vm_run_strategy("Always")
    em.subresource_handlers[("subresources.kubevirt.io", "virtualmachines", "stop")] = _vm_run_strategy("Halted")
