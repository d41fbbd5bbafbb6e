"""The validators of tests/support/kube_schemas.py reject what the API server would reject.

Each check is shown both ways: a valid object passes, and one mistake of each kind is reported with
its path. The CRD checks use a small CRD of their own, so they hold whatever k8s/crds/ contains.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.support import kube_schemas as ks


def _vm() -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "i-0123456789ab", "namespace": "cyberdesk", "labels": {"cyberdesk.io/vm": "i-0123"}},
        "spec": {
            "runStrategy": "Always",
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/component": "guest-agent"}},
                "spec": {
                    "domain": {
                        "cpu": {"cores": 2},
                        "memory": {"guest": "2Gi"},
                        "resources": {"requests": {"memory": "2Gi", "cpu": 1}},
                        "devices": {
                            "disks": [{"name": "root", "disk": {"bus": "virtio"}}],
                            "interfaces": [{"name": "default", "masquerade": {}, "ports": [{"port": 49983}]}],
                        },
                    },
                    "networks": [{"name": "default", "pod": {}}],
                    "volumes": [
                        {"name": "root", "containerDisk": {"image": "ghcr.io/cyberdesk/guest:dev"}},
                        {"name": "cloudinit", "cloudInitNoCloud": {"secretRef": {"name": "i-0123456789ab-agent"}}},
                    ],
                },
            },
        },
    }


def test_a_valid_virtual_machine_passes() -> None:
    ks.validate_kubevirt(_vm())
    ks.validate(_vm())


def test_kubevirt_mistakes_are_reported_with_their_paths() -> None:
    vm = _vm()
    domain = vm["spec"]["template"]["spec"]["domain"]
    domain["cpuu"] = {"cores": 2}  # misspelt: the server would silently drop it
    domain["devices"]["interfaces"][0]["ports"][0]["port"] = "http"  # an int32
    del vm["spec"]["template"]["spec"]["volumes"][0]["name"]  # required
    vm["metadata"]["labels"]["bad label"] = "x"
    with pytest.raises(ks.Invalid) as raised:
        ks.validate_kubevirt(vm)
    errors = raised.value.errors
    assert any(e.startswith("/spec/template/spec/domain:") and "'cpuu'" in e for e in errors), errors
    assert any(e.startswith("/spec/template/spec/domain/devices/interfaces/0/ports/0/port:") for e in errors)
    assert any(e.startswith("/spec/template/spec/volumes/0:") and "'name' is a required" in e for e in errors)
    assert any("'bad label'" in e for e in errors)
    assert len(errors) == 4, errors


def test_kubevirt_kinds_come_from_the_document() -> None:
    kinds = ks.kubevirt_kinds()
    for pair in [
        ("kubevirt.io/v1", "VirtualMachine"),
        ("kubevirt.io/v1", "VirtualMachineInstance"),
        ("pool.kubevirt.io/v1beta1", "VirtualMachinePool"),
        ("snapshot.kubevirt.io/v1beta1", "VirtualMachineSnapshot"),
        ("snapshot.kubevirt.io/v1beta1", "VirtualMachineRestore"),
    ]:
        assert pair in kinds
    wrong = {**_vm(), "apiVersion": "kubevirt.io/v2"}
    assert ks.kubevirt_errors(wrong) == ["/: kubevirt.io/v2 VirtualMachine is not a KubeVirt kind one can create"]


def test_kubevirt_quantities_and_int_or_string() -> None:
    vm = _vm()
    vm["spec"]["template"]["spec"]["domain"]["resources"]["requests"] = {"cpu": "500m", "memory": 2147483648}
    vm["spec"]["template"]["spec"]["readinessProbe"] = {"tcpSocket": {"port": 49983}}
    ks.validate_kubevirt(vm)
    vm["spec"]["template"]["spec"]["readinessProbe"] = {"tcpSocket": {"port": "agent"}}
    ks.validate_kubevirt(vm)
    vm["spec"]["template"]["spec"]["readinessProbe"] = {"tcpSocket": {"port": [1]}}
    assert ks.kubevirt_errors(vm)


def test_a_snapshot_and_a_pool() -> None:
    snapshot = {
        "apiVersion": "snapshot.kubevirt.io/v1beta1",
        "kind": "VirtualMachineSnapshot",
        "metadata": {"name": "s-1", "namespace": "cyberdesk"},
        "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "i-0123456789ab"}},
    }
    ks.validate_kubevirt(snapshot)
    del snapshot["spec"]["source"]["name"]
    assert any("'name' is a required" in e for e in ks.kubevirt_errors(snapshot))
    vm = _vm()
    pool = {
        "apiVersion": "pool.kubevirt.io/v1beta1",
        "kind": "VirtualMachinePool",
        "metadata": {"name": "warm", "namespace": "cyberdesk"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"cyberdesk.io/pool": "warm"}},
            "virtualMachineTemplate": {"metadata": {"labels": {"cyberdesk.io/pool": "warm"}}, "spec": vm["spec"]},
        },
    }
    ks.validate_kubevirt(pool)
    pool["spec"]["replicas"] = "1"
    assert ks.kubevirt_errors(pool)


# --- built-in kinds -------------------------------------------------------------------------------


def _deployment() -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x", "namespace": "cyberdesk"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "x", "image": "i:1", "ports": [{"containerPort": 80}]}]},
            },
        },
    }


def test_builtin_objects_are_checked_strictly() -> None:
    ks.validate_builtin(_deployment())
    bad = _deployment()
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["imagePullPolcy"] = "Always"
    container["ports"][0]["containerPort"] = "80"
    with pytest.raises(ks.Invalid) as raised:
        ks.validate_builtin(bad)
    errors = raised.value.errors
    assert any("'imagePullPolcy' was unexpected" in e for e in errors), errors
    assert any(e.startswith("/spec/template/spec/containers/0/ports/0/containerPort:") for e in errors), errors
    assert ks.builtin_errors({**_deployment(), "kind": "Deploymnt"}) == [
        f"/: apps/v1 Deploymnt is not a built-in kind of Kubernetes {ks.KUBERNETES_VERSION}"
    ]
    assert any("/metadata/name" in e for e in ks.builtin_errors({**_deployment(), "metadata": {"name": "X_y"}}))


def test_rbac_names_may_hold_colons() -> None:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "cyberdesk:instance-operator"},
        "rules": [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}],
    }
    ks.validate_builtin(role)
    role["rules"][0]["verb"] = ["get"]
    assert ks.builtin_errors(role)


# --- CRDs -----------------------------------------------------------------------------------------

CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.io"},
    "spec": {
        "group": "example.io",
        "scope": "Namespaced",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "listKind": "WidgetList"},
        "versions": [
            {"name": "v1beta1", "served": False, "storage": False, "schema": {"openAPIV3Schema": {"type": "object"}}},
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-validations": [
                            {"rule": "self.metadata.name.startsWith('w-')", "message": "names start with w-"}
                        ],
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "x-kubernetes-validations": [
                                    {"rule": "!has(self.max) || self.size <= self.max", "message": "size above max"},
                                    {"rule": "self.size >= oldSelf.size", "message": "size may only grow"},
                                ],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "max": {"type": "integer"},
                                    "color": {"type": "string", "enum": ["red", "blue"]},
                                    "port": {"x-kubernetes-int-or-string": True},
                                    "note": {"type": "string", "nullable": True},
                                    "since": {"type": "string", "format": "date-time"},
                                    "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                                    "empty": {"type": "object"},
                                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                    "cidrs": {
                                        "type": "array",
                                        "x-kubernetes-list-type": "set",
                                        "items": {
                                            "type": "string",
                                            "x-kubernetes-validations": [
                                                {"rule": "isCIDR(self) || isIP(self)", "message": "not a CIDR"}
                                            ],
                                        },
                                    },
                                    "ports": {
                                        "type": "array",
                                        "x-kubernetes-list-type": "map",
                                        "x-kubernetes-list-map-keys": ["name"],
                                        "items": {
                                            "type": "object",
                                            "required": ["name"],
                                            "properties": {
                                                "name": {"type": "string"},
                                                "number": {
                                                    "type": "integer",
                                                    "x-kubernetes-validations": [
                                                        {"rule": "self == oldSelf", "message": "number is immutable"}
                                                    ],
                                                },
                                            },
                                        },
                                    },
                                    "fancy": {
                                        "type": "string",
                                        "x-kubernetes-validations": [{"rule": "self.reverse() == self"}],
                                    },
                                },
                            },
                            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                        },
                    }
                },
            },
        ],
    },
}


def _widget(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "example.io/v1",
        "kind": "Widget",
        "metadata": {"name": "w-1", "namespace": "cyberdesk"},
        "spec": {"size": 2, **spec},
    }


def test_the_test_crd_is_a_valid_crd() -> None:
    ks.validate_builtin(CRD)


def test_a_valid_custom_resource_passes() -> None:
    widget = _widget(
        max=3,
        color="red",
        port=8080,
        note=None,
        since="2026-12-01T14:00:00Z",
        extra={"anything": {"goes": [1]}},
        empty={},
        labels={"a": "b"},
        cidrs=["10.0.0.0/8", "2001:db8::1"],
        ports=[{"name": "a", "number": 1}, {"name": "b", "number": 1}],
    )
    ks.validate_against_crd(widget, CRD)
    ks.validate_against_crd({**widget, "spec": {**widget["spec"], "port": "http"}}, CRD)
    ks.validate(widget, crds={("example.io", "Widget"): CRD})


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"colour": "red"}, "/spec: Additional properties are not allowed ('colour' was unexpected)"),
        ({"color": "green"}, "/spec/color: 'green' is not one of ['red', 'blue']"),
        ({"size": 0}, "/spec/size: 0 is less than the minimum of 1"),
        ({"size": True}, "/spec/size: True is not of type 'integer'"),
        ({"max": None}, "/spec/max: None is not of type 'integer'"),
        ({"port": 1.5}, "/spec/port: 1.5 is not of type 'integer', 'string'"),
        ({"since": "yesterday"}, "/spec/since: 'yesterday' is not a 'date-time'"),
        ({"since": "2026-13-01T00:00:00Z"}, "/spec/since: '2026-13-01T00:00:00Z' is not a 'date-time'"),
        ({"labels": {"a": 1}}, "/spec/labels/a: 1 is not of type 'string'"),
        # An object of no listed properties keeps none (the API server would prune the field).
        ({"empty": {"x": 1}}, "/spec/empty: Additional properties are not allowed ('x' was unexpected)"),
        ({"cidrs": ["10.0.0.0/8", "10.0.0.0/8"]}, "/spec/cidrs: ['10.0.0.0/8', '10.0.0.0/8'] has non-unique elements"),
        ({"cidrs": ["example.com"]}, "/spec/cidrs/0: not a CIDR"),
        ({"cidrs": ["10.0.0.0/33"]}, "/spec/cidrs/0: not a CIDR"),
        ({"ports": [{"name": "a"}, {"name": "a"}]}, "/spec/ports/1: duplicate entry for the keys ['name']"),
        ({"max": 1}, "/spec: size above max"),
    ],
)
def test_custom_resource_mistakes(spec: dict[str, Any], expected: str) -> None:
    assert ks.crd_errors(_widget(**spec), CRD) == [expected]


def test_required_and_the_root_rule() -> None:
    widget = _widget()
    del widget["spec"]["size"]
    assert ks.crd_errors(widget, CRD) == ["/spec: 'size' is a required property"]
    assert ks.crd_errors({**_widget(), "metadata": {"name": "x-1"}}, CRD) == ["/: names start with w-"]
    # CEL rules run only on what passed the structural checks, as on the API server.
    assert ks.crd_errors({**_widget(), "metadata": {"name": "w_1"}}, CRD) == [
        "/metadata/name: 'w_1' is not a DNS subdomain (lower case, digits, '-', '.')"
    ]
    meta_typo = {**_widget(), "metadata": {"name": "w-1", "lables": {}}}
    (error,) = ks.crd_errors(meta_typo, CRD)
    assert error == "/metadata: Additional properties are not allowed ('lables' was unexpected)"


def test_versions_kinds_and_groups() -> None:
    assert ks.crd_errors({**_widget(), "apiVersion": "example.io/v1beta1"}, CRD) == [
        "/apiVersion: version 'v1beta1' is not served"
    ]
    assert ks.crd_errors({**_widget(), "apiVersion": "example.io/v2"}, CRD) == [
        "/apiVersion: the CRD has no version 'v2'"
    ]
    assert ks.crd_errors({**_widget(), "kind": "Gadget"}, CRD) == ["/kind: 'Gadget' is not the CRD's 'Widget'"]
    assert ks.crd_errors({**_widget(), "apiVersion": "other.io/v1"}, CRD) == [
        "/apiVersion: group 'other.io' is not the CRD's 'example.io'"
    ]


def test_transition_rules_run_on_updates_only() -> None:
    old = _widget(size=3, ports=[{"name": "a", "number": 1}])
    shrunk = _widget(size=2, ports=[{"name": "a", "number": 1}])
    assert ks.crd_errors(shrunk, CRD) == []  # a create: no old value, the rule does not apply
    assert ks.crd_errors(shrunk, CRD, old=old) == ["/spec: size may only grow"]
    renumbered = _widget(size=3, ports=[{"name": "a", "number": 2}])
    assert ks.crd_errors(renumbered, CRD, old=old) == ["/spec/ports/0/number: number is immutable"]
    # A list-map entry is compared with the old entry of the same key: a new entry has none.
    added = _widget(size=3, ports=[{"name": "b", "number": 5}, {"name": "a", "number": 1}])
    assert ks.crd_errors(added, CRD, old=old) == []


def test_a_rule_that_cannot_be_evaluated_fails_loudly() -> None:
    (error,) = ks.crd_errors(_widget(fancy="abba"), CRD)
    assert error.startswith("/spec/fancy: the rule 'self.reverse() == self' could not be evaluated here: ")


def test_crd_from_a_file(tmp_path: Any) -> None:
    import yaml

    path = tmp_path / "crds.yaml"
    other = copy.deepcopy(CRD)
    other["spec"]["names"]["kind"] = "Gadget"
    path.write_text(yaml.safe_dump_all([other, CRD]))
    ks.validate_against_crd(_widget(), path)
    with pytest.raises(ks.Invalid):
        ks.validate_against_crd(_widget(colour="red"), str(path))
    with pytest.raises(ValueError, match="defines no CRD"):
        ks.validate_against_crd({**_widget(), "kind": "Doohickey"}, path)


def test_builtin_errors_agree_with_kubernetes_validate_itself() -> None:
    """validate_builtin reads kubernetes-validate's strict schemas; its own entry point judges alike."""
    import kubernetes_validate

    good, bad = _deployment(), _deployment()
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    kubernetes_validate.validate(good, ks.KUBERNETES_VERSION, strict=True)
    assert ks.builtin_errors(good) == []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, ks.KUBERNETES_VERSION, strict=True)
    assert ks.builtin_errors(bad)
