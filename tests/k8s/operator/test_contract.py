"""The CRDs in k8s/crds/ and the names in instance_svc/operator/contract.py say the same thing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from instance_svc.operator import contract

CRDS = Path(__file__).resolve().parents[3] / "k8s" / "crds"


def _crds() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                out[doc["spec"]["names"]["kind"]] = doc
    return out


@pytest.mark.parametrize(
    ("kind", "group", "version", "plural"),
    [
        (contract.INSTANCE_KIND, contract.GROUP, contract.VERSION, contract.INSTANCE_PLURAL),
        (contract.TEMPLATE_KIND, contract.GROUP, contract.VERSION, contract.TEMPLATE_PLURAL),
        (contract.SNAPSHOT_KIND, contract.GROUP, contract.VERSION, contract.SNAPSHOT_PLURAL),
        (contract.WARM_POOL_KIND, contract.GROUP, contract.VERSION, contract.WARM_POOL_PLURAL),
        ("KopfPeering", contract.PEERING_GROUP, contract.PEERING_VERSION, contract.PEERING_PLURAL),
    ],
)
def test_crd_names_match_the_contract(kind: str, group: str, version: str, plural: str) -> None:
    crd = _crds()[kind]
    assert crd["metadata"]["name"] == f"{plural}.{group}"
    assert crd["spec"]["group"] == group
    assert crd["spec"]["names"]["plural"] == plural
    assert crd["spec"]["scope"] == "Namespaced"
    assert [v["name"] for v in crd["spec"]["versions"] if v["served"] and v["storage"]] == [version]


def test_phase_enums_match_the_contract() -> None:
    crds = _crds()
    status = crds[contract.INSTANCE_KIND]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert tuple(status["properties"]["phase"]["enum"]) == contract.PHASES
    snap = crds[contract.SNAPSHOT_KIND]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert snap["properties"]["phase"]["enum"] == [
        contract.SNAPSHOT_PHASE_PENDING,
        contract.SNAPSHOT_PHASE_IN_PROGRESS,
        contract.SNAPSHOT_PHASE_READY,
        contract.SNAPSHOT_PHASE_FAILED,
    ]


def test_instance_crd_has_status_subresource_and_printer_columns() -> None:
    version = _crds()[contract.INSTANCE_KIND]["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Expiry"] == ".status.expiry"
    assert columns["IP"] == ".status.ip"
    assert columns["Age"] == ".metadata.creationTimestamp"
