"""The objects the operator writes, as pure functions of the custom resources (no API calls here).

Every name is deterministic (a function of the instance's or pool member's name), so writing the
same object twice is a 409 the operator treats as done, never a second object. tests/k8s/operator
checks each kind against KubeVirt's and Kubernetes' schemas.
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from instance_svc.operator import cloudinit, contract, tls

Obj = dict[str, Any]


@dataclass(frozen=True)
class Shape:
    """What a VM is made of: the instance's (or pool's) template, resources and desktop."""

    template: str
    vcpu: int
    memory_mib: int
    disk_mib: int
    desktop: bool
    screen: tuple[int, int] | None = None

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> Shape:
        res = spec.get("resources") or {}
        screen = spec.get("screen")
        return cls(
            template=str(spec.get("template", "")),
            vcpu=int(res.get("vcpu", 1)),
            memory_mib=int(res.get("memoryMiB", 512)),
            disk_mib=int(res.get("diskMiB", 2048)),
            desktop=bool(spec.get("desktop", False)),
            screen=(int(screen["width"]), int(screen["height"])) if screen else None,
        )


def owner_ref(obj: Mapping[str, Any], *, controller: bool = True) -> Obj:
    """An ownerReference to `obj`: the garbage collector deletes the dependent when `obj` goes."""
    return {
        "apiVersion": obj.get("apiVersion", contract.API_VERSION),
        "kind": obj.get("kind", contract.INSTANCE_KIND),
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def common_labels(vm_name: str, *, instance: str = "", tenant: str = "", pool: str = "") -> dict[str, str]:
    labels = {
        contract.LABEL_NAME: contract.APP_NAME,
        contract.LABEL_PART_OF: contract.APP_NAME,
        contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
        contract.LABEL_VM: vm_name,
    }
    if instance:
        labels[contract.LABEL_INSTANCE] = instance
    if tenant:
        labels[contract.LABEL_TENANT] = tenant
    if pool:
        labels[contract.LABEL_POOL] = pool
        labels[contract.LABEL_POOL_STATE] = contract.POOL_STATE_STARTING
    return labels


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret(
    vm_name: str,
    namespace: str,
    *,
    owner: Obj,
    labels: Mapping[str, str],
    port: int,
    instance_id: str,
    shape: Shape,
) -> Obj:
    """The VM's Secret: a fresh token and TLS material, and the cloud-config carrying them."""
    token = secrets.token_urlsafe(32)
    material = tls.make(contract.agent_server_name(vm_name))
    userdata = cloudinit.render(
        token=token,
        cert_pem=material.cert_pem,
        key_pem=material.key_pem,
        port=port,
        instance_id=instance_id,
        disk_mib=shape.disk_mib,
        desktop=shape.desktop,
    )
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": contract.secret_name(vm_name),
            "namespace": namespace,
            "labels": dict(labels),
            "ownerReferences": [owner],
        },
        "data": {
            contract.SECRET_KEY_TOKEN: _b64(token),
            contract.SECRET_KEY_CA: _b64(material.ca_pem),
            contract.SECRET_KEY_TLS_CERT: _b64(material.cert_pem),
            contract.SECRET_KEY_TLS_KEY: _b64(material.key_pem),
            contract.SECRET_KEY_USERDATA: _b64(userdata),
        },
    }


def _storage(size_mib: int, storage_class: str) -> Obj:
    storage: Obj = {"resources": {"requests": {"storage": f"{size_mib}Mi"}}}
    if storage_class:
        storage["storageClassName"] = storage_class
    return storage


def virtual_machine(
    vm_name: str,
    namespace: str,
    *,
    template: Mapping[str, Any],
    shape: Shape,
    owner: Obj,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
) -> Obj:
    """The kubevirt.io/v1 VirtualMachine: root disk from the template, a writable disk, cloud-init from the Secret."""
    spec = template.get("spec") or {}
    source = spec.get("source") or {}
    storage_class = str(spec.get("storageClassName") or "")
    volumes: list[Obj] = []
    disks: list[Obj] = []
    dv_templates: list[Obj] = []
    if "containerDisk" in source:
        volumes.append({"name": "rootdisk", "containerDisk": {"image": source["containerDisk"]["image"]}})
        disks.append({"name": "rootdisk", "disk": {"bus": "virtio"}, "bootOrder": 1})
        data = f"{vm_name}-data"
        dv_templates.append(
            {
                "metadata": {"name": data},
                "spec": {"source": {"blank": {}}, "storage": _storage(shape.disk_mib, storage_class)},
            }
        )
        volumes.append({"name": "datadisk", "dataVolume": {"name": data}})
        disks.append({"name": "datadisk", "disk": {"bus": "virtio"}})
    else:
        dv = source.get("dataVolume") or {}
        root = f"{vm_name}-root"
        if "pvc" in dv:
            dv_source: Obj = {"pvc": {"namespace": dv["pvc"]["namespace"], "name": dv["pvc"]["name"]}}
        else:
            dv_source = {"http": {"url": dv.get("url", "")}}
        dv_templates.append(
            {
                "metadata": {"name": root},
                "spec": {"source": dv_source, "storage": _storage(shape.disk_mib, storage_class)},
            }
        )
        volumes.append({"name": "rootdisk", "dataVolume": {"name": root}})
        disks.append({"name": "rootdisk", "disk": {"bus": "virtio"}, "bootOrder": 1})
    volumes.append(
        {"name": "cloudinitdisk", "cloudInitNoCloud": {"secretRef": {"name": contract.secret_name(vm_name)}}}
    )
    disks.append({"name": "cloudinitdisk", "disk": {"bus": "virtio"}})
    pod_labels = {**labels, contract.LABEL_COMPONENT: contract.COMPONENT_GUEST_AGENT}
    pod_labels.pop(contract.LABEL_POOL_STATE, None)  # changes at readiness; the pod need not follow
    return {
        "apiVersion": f"{contract.KUBEVIRT_GROUP}/{contract.KUBEVIRT_VERSION}",
        "kind": "VirtualMachine",
        "metadata": {
            "name": vm_name,
            "namespace": namespace,
            "labels": dict(labels),
            "annotations": dict(annotations),
            "ownerReferences": [owner],
        },
        "spec": {
            "runStrategy": "Always",
            "dataVolumeTemplates": dv_templates,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "domain": {
                        "cpu": {"cores": shape.vcpu},
                        "memory": {"guest": f"{shape.memory_mib}Mi"},
                        "devices": {
                            "disks": disks,
                            "interfaces": [{"name": "default", "masquerade": {}}],
                            "rng": {},
                            # The desktop is an X server inside the guest, read through the agent.
                            "autoattachGraphicsDevice": False,
                        },
                    },
                    "networks": [{"name": "default", "pod": {}}],
                    "terminationGracePeriodSeconds": 10,
                    "volumes": volumes,
                },
            },
        },
    }


def _split(entries: Iterable[str]) -> tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv6Network]]:
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for entry in entries:
        net = ipaddress.ip_network(entry, strict=False)
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    return v4, v6


def _blocks(allow: list[Any], refused: list[Any], everything: str) -> list[Obj]:
    """ipBlocks for `allow` (everything when empty) minus `refused`, as NetworkPolicy validation wants.

    An `except` must lie strictly inside its cidr: refused ranges inside an allowed one become its
    excepts; an allowed range inside a refused one is dropped (the platform's denials win).
    """
    targets = allow or [ipaddress.ip_network(everything)]
    out: list[Obj] = []
    for net in targets:
        if any(net.subnet_of(r) for r in refused):
            continue
        excepts = sorted({str(r) for r in refused if r != net and r.subnet_of(net)})
        block: Obj = {"cidr": str(net)}
        if excepts:
            block["except"] = excepts
        out.append({"ipBlock": block})
    return out


def network_policy(
    vm_name: str,
    namespace: str,
    *,
    owner: Obj,
    labels: Mapping[str, str],
    port: int,
    network: Mapping[str, Any] | None,
) -> Obj:
    """Only the platform's callers reach the agent port; egress only where the instance's policy allows."""
    ingress = [
        {
            "from": [
                {
                    "podSelector": {
                        "matchExpressions": [
                            {"key": contract.LABEL_NAME, "operator": "In", "values": [contract.APP_NAME]},
                            {
                                "key": contract.LABEL_COMPONENT,
                                "operator": "In",
                                "values": list(contract.AGENT_CLIENT_COMPONENTS),
                            },
                        ]
                    }
                }
            ],
            "ports": [{"protocol": "TCP", "port": port}],
        }
    ]
    egress: list[Obj] = []
    if (network or {}).get("mode") == contract.NETWORK_INTERNET:
        egress_spec = (network or {}).get("egress") or {}
        allow4, allow6 = _split(egress_spec.get("allow") or [])
        deny4, deny6 = _split(egress_spec.get("deny") or [])
        fixed4, fixed6 = _split([*contract.DENIED_EGRESS_V4, *contract.DENIED_EGRESS_V6])
        to: list[Obj] = []
        if allow4 or not allow6:
            to += _blocks(list(allow4), [*fixed4, *deny4], "0.0.0.0/0")
        if allow6 or not allow4:
            to += _blocks(list(allow6), [*fixed6, *deny6], "::/0")
        if to:
            egress.append({"to": to})
        # Names are resolved by the cluster's DNS only (not an open resolver on a private address).
        egress.append(
            {
                "to": [
                    {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                    }
                ],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": vm_name, "namespace": namespace, "labels": dict(labels), "ownerReferences": [owner]},
        "spec": {
            "podSelector": {"matchLabels": {contract.LABEL_VM: vm_name}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }


def vm_snapshot(name: str, namespace: str, *, vm_name: str, owner: Obj, labels: Mapping[str, str]) -> Obj:
    return {
        "apiVersion": f"{contract.SNAPSHOT_GROUP}/{contract.SNAPSHOT_VERSION}",
        "kind": "VirtualMachineSnapshot",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels), "ownerReferences": [owner]},
        "spec": {
            "source": {"apiGroup": contract.KUBEVIRT_GROUP, "kind": "VirtualMachine", "name": vm_name},
            "failureDeadline": "10m",
        },
    }


def vm_restore(
    name: str,
    namespace: str,
    *,
    snapshot_name: str,
    vm_name: str,
    owner: Obj,
    labels: Mapping[str, str],
    vm_labels: Mapping[str, str],
    vm_annotations: Mapping[str, str],
    pod_labels: Mapping[str, str],
    cloud_init_volume_index: int,
) -> Obj:
    """A restore into a new VM `vm_name`, patched to be this instance's (labels, owner, its own Secret)."""
    import json

    patches = [
        {"op": "replace", "path": "/metadata/name", "value": vm_name},
        {"op": "add", "path": "/metadata/labels", "value": dict(vm_labels)},
        {"op": "add", "path": "/metadata/annotations", "value": dict(vm_annotations)},
        {"op": "add", "path": "/metadata/ownerReferences", "value": [owner]},
        {"op": "add", "path": "/spec/template/metadata/labels", "value": dict(pod_labels)},
        {
            "op": "replace",
            "path": f"/spec/template/spec/volumes/{cloud_init_volume_index}/cloudInitNoCloud/secretRef/name",
            "value": contract.secret_name(vm_name),
        },
    ]
    return {
        "apiVersion": f"{contract.SNAPSHOT_GROUP}/{contract.SNAPSHOT_VERSION}",
        "kind": "VirtualMachineRestore",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels), "ownerReferences": [owner]},
        "spec": {
            "target": {"apiGroup": contract.KUBEVIRT_GROUP, "kind": "VirtualMachine", "name": vm_name},
            "virtualMachineSnapshotName": snapshot_name,
            "patches": [json.dumps(p) for p in patches],
        },
    }


def pod_labels(labels: Mapping[str, str]) -> dict[str, str]:
    out = {**labels, contract.LABEL_COMPONENT: contract.COMPONENT_GUEST_AGENT}
    out.pop(contract.LABEL_POOL_STATE, None)
    return out
