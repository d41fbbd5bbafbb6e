"""What the Kubernetes benchmarks (k8s_lifecycle, k8s_operator) read off the emulated cluster."""

from __future__ import annotations

import json
import time
from typing import Any

from instance_svc.operator import contract
from kube_emulator.emulator import Emulator

INSTANCES = f"{contract.GROUP}/{contract.VERSION}/{contract.INSTANCE_PLURAL}"
VMS = f"{contract.KUBEVIRT_GROUP}/{contract.KUBEVIRT_VERSION}/{contract.VM_PLURAL}"
VMIS = f"{contract.KUBEVIRT_GROUP}/{contract.KUBEVIRT_VERSION}/{contract.VMI_PLURAL}"


class Moments:
    """When each VM was written, its VMI and its instance's status became Running, and each instance was gone.

    Read on the emulator's loop as each change is stored, so every moment is on one clock.
    """

    def __init__(self) -> None:
        self.vm_written: dict[str, float] = {}
        self.vmi_running: dict[str, float] = {}
        self.status_running: dict[str, float] = {}
        self.gone: dict[str, float] = {}
        # Size of each CyberdeskInstance (JSON) once Running: what every replica's watch cache holds.
        self.object_bytes: dict[str, int] = {}

    def install(self, em: Emulator) -> None:
        """Listen to `em`'s VMs, VMIs and instances."""

        def on_vm(kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
            if kind == "ADDED":
                self.vm_written.setdefault(obj["metadata"]["name"], time.perf_counter())

        def on_vmi(kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
            if (obj.get("status") or {}).get("phase") == "Running":
                self.vmi_running.setdefault(obj["metadata"]["name"], time.perf_counter())

        def on_instance(kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
            st = obj.get("status") or {}
            name = obj["metadata"]["name"]
            if st.get("phase") == contract.PHASE_RUNNING and st.get("agentEndpoint"):
                self.status_running.setdefault(name, time.perf_counter())
                self.object_bytes.setdefault(name, len(json.dumps(obj)))
            if kind == "DELETED":
                self.gone.setdefault(name, time.perf_counter())

        em.listeners[VMS].append(on_vm)
        em.listeners[VMIS].append(on_vmi)
        em.listeners[INSTANCES].append(on_instance)
