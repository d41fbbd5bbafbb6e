"""The objects the operator writes, built without a cluster and checked against the real schemas."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from instance_svc.operator import contract, manifests, tls
from tests.support.kube_schemas import validate_builtin, validate_kubevirt

OWNER = {
    "apiVersion": contract.API_VERSION,
    "kind": contract.INSTANCE_KIND,
    "name": "i-1",
    "uid": "2b1f0c1e-0000-4000-8000-000000000001",
    "controller": True,
    "blockOwnerDeletion": True,
}
SHAPE = manifests.Shape(template="t", vcpu=2, memory_mib=1024, disk_mib=4096, desktop=False)


def _template(source: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "t"}, "spec": {"source": source, "storageClassName": "fast", "agentPort": 49983}}


@pytest.mark.parametrize(
    "source",
    [
        {"containerDisk": {"image": "ghcr.io/cyberdesk/guest:1"}},
        {"dataVolume": {"pvc": {"namespace": "images", "name": "golden"}}},
        {"dataVolume": {"url": "https://images.example/guest.qcow2"}},
    ],
)
def test_virtual_machines_of_every_disk_source_validate(source: dict[str, Any]) -> None:
    vm = manifests.virtual_machine(
        "i-1", "cyberdesk", template=_template(source), shape=SHAPE, owner=OWNER, labels={"a": "b"}, annotations={}
    )
    validate_kubevirt(vm)
    spec = vm["spec"]
    assert spec["template"]["spec"]["domain"]["cpu"] == {"cores": 2}
    assert spec["template"]["spec"]["domain"]["memory"] == {"guest": "1024Mi"}
    assert [t["spec"]["storage"]["resources"]["requests"]["storage"] for t in spec["dataVolumeTemplates"]] == ["4096Mi"]
    assert spec["dataVolumeTemplates"][0]["spec"]["storage"]["storageClassName"] == "fast"
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["cloudinitdisk"] == {
        "name": "cloudinitdisk",
        "cloudInitNoCloud": {"secretRef": {"name": "i-1-agent"}},
    }
    if "containerDisk" in source:
        assert volumes["rootdisk"]["containerDisk"]["image"] == "ghcr.io/cyberdesk/guest:1"
        assert volumes["datadisk"]["dataVolume"]["name"] == "i-1-data"
    else:
        assert volumes["rootdisk"]["dataVolume"]["name"] == "i-1-root"
        assert "datadisk" not in volumes
    pod = spec["template"]["metadata"]["labels"]
    assert pod[contract.LABEL_COMPONENT] == contract.COMPONENT_GUEST_AGENT


def _policy(network: dict[str, Any] | None) -> dict[str, Any]:
    policy = manifests.network_policy("i-1", "cyberdesk", owner=OWNER, labels={}, port=49983, network=network)
    validate_builtin(policy)
    return policy


def test_a_vm_without_network_gets_no_egress_at_all() -> None:
    spec = _policy(None)["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["egress"] == []
    assert spec["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 49983}]


def test_internet_egress_never_reaches_private_link_local_or_metadata_ranges() -> None:
    spec = _policy({"mode": "Internet"})["spec"]
    blocks = {t["ipBlock"]["cidr"]: t["ipBlock"]["except"] for t in spec["egress"][0]["to"]}
    assert set(blocks) == {"0.0.0.0/0", "::/0"}
    for denied in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8"):
        assert denied in blocks["0.0.0.0/0"]
    assert {"fc00::/7", "fe80::/10", "::1/128"} <= set(blocks["::/0"])
    dns = spec["egress"][1]
    assert dns["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]


def test_allow_and_deny_lists_become_ip_blocks_and_platform_denials_win() -> None:
    spec = _policy(
        {
            "mode": "Internet",
            "egress": {"allow": ["203.0.113.0/24", "10.1.0.0/16", "2001:db8::/32"], "deny": ["203.0.113.9"]},
        }
    )["spec"]
    blocks = [t["ipBlock"] for t in spec["egress"][0]["to"]]
    # 10.1.0.0/16 lies inside 10/8, which no instance may reach: it is dropped, not allowed.
    assert blocks == [{"cidr": "203.0.113.0/24", "except": ["203.0.113.9/32"]}, {"cidr": "2001:db8::/32"}]


def test_agent_tls_is_a_ca_of_its_own_and_a_server_certificate_for_the_vm_name() -> None:
    material = tls.make(contract.agent_server_name("i-1"))
    ca = x509.load_pem_x509_certificate(material.ca_pem.encode())
    cert = x509.load_pem_x509_certificate(material.cert_pem.encode())
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert san.get_values_for_type(x509.DNSName) == ["i-1.agent.cyberdesk.internal"]
    assert ca.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value.ca
    other = tls.make(contract.agent_server_name("i-2"))
    assert other.ca_pem != material.ca_pem  # one CA per VM


def test_the_secret_carries_token_tls_and_cloud_config_and_validates() -> None:
    secret = manifests.secret("i-1", "cyberdesk", owner=OWNER, labels={}, port=49983, instance_id="i-1", shape=SHAPE)
    validate_builtin(secret)
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(data) == {"token", "ca.crt", "tls.crt", "tls.key", "userdata"}
    assert len(data["token"]) >= 32
    assert data["token"] in data["userdata"] and data["tls.key"].strip().splitlines()[1] in data["userdata"]
    again = manifests.secret("i-1", "cyberdesk", owner=OWNER, labels={}, port=49983, instance_id="i-1", shape=SHAPE)
    assert base64.b64decode(again["data"]["token"]).decode() != data["token"]
