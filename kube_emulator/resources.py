"""The resources the emulator serves: the built-ins Cyberdesk uses, KubeVirt's, CDI's and our CRDs.

Subresources are as in the real servers: KubeVirt's CRDs give VirtualMachine, the pool and the
snapshot kinds a status subresource but not VirtualMachineInstance (virt-handler writes a VMI
whole), so a test's virt-controller stand-in writes VMI status the way KubeVirt does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from kube_emulator import kubevirt

if TYPE_CHECKING:
    from kube_emulator.emulator import Emulator

CRD_DIR = Path(__file__).resolve().parent.parent / "k8s" / "crds"


def register_all(em: Emulator, crd_dir: Path = CRD_DIR) -> None:
    from kube_emulator.emulator import Resource

    status = frozenset({"status"})
    builtins = [
        Resource("", "v1", "namespaces", "Namespace", namespaced=False, subresources=status, generation=False),
        Resource("", "v1", "secrets", "Secret", generation=False),
        Resource("", "v1", "configmaps", "ConfigMap", generation=False),
        Resource("", "v1", "services", "Service", subresources=status, generation=False),
        Resource("", "v1", "pods", "Pod", subresources=status, generation=False),
        Resource("", "v1", "events", "Event", generation=False),
        Resource("", "v1", "serviceaccounts", "ServiceAccount", generation=False),
        Resource("events.k8s.io", "v1", "events", "Event", generation=False),
        Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy"),
        Resource("coordination.k8s.io", "v1", "leases", "Lease", generation=False),
        Resource(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            namespaced=False,
            subresources=status,
        ),
        # KubeVirt (kubevirt.io/v1 and its aggregated subresources API), CDI.
        Resource(
            "kubevirt.io", "v1", "virtualmachines", "VirtualMachine", subresources=status, short_names=("vm", "vms")
        ),
        Resource("kubevirt.io", "v1", "virtualmachineinstances", "VirtualMachineInstance", short_names=("vmi", "vmis")),
        Resource(
            "subresources.kubevirt.io",
            "v1",
            "virtualmachineinstances",
            "VirtualMachineInstance",
            subresources=frozenset({"pause", "unpause"}),
        ),
        Resource(
            "subresources.kubevirt.io",
            "v1",
            "virtualmachines",
            "VirtualMachine",
            subresources=frozenset({"start", "stop", "restart"}),
        ),
        Resource(
            "pool.kubevirt.io",
            "v1beta1",
            "virtualmachinepools",
            "VirtualMachinePool",
            subresources=frozenset({"status", "scale"}),
        ),
        Resource(
            "snapshot.kubevirt.io", "v1beta1", "virtualmachinesnapshots", "VirtualMachineSnapshot", subresources=status
        ),
        Resource(
            "snapshot.kubevirt.io",
            "v1beta1",
            "virtualmachinesnapshotcontents",
            "VirtualMachineSnapshotContent",
            subresources=status,
        ),
        Resource(
            "snapshot.kubevirt.io", "v1beta1", "virtualmachinerestores", "VirtualMachineRestore", subresources=status
        ),
        Resource("cdi.kubevirt.io", "v1beta1", "datavolumes", "DataVolume", subresources=status, short_names=("dv",)),
    ]
    for res in builtins:
        em.register(res)
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                em.register_crd(doc)
    kubevirt.install(em)
