"""The kubevirt runtime's records as resources, pure: round trips, and every shape validates against its CRD."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from cyberdesk_common.config import ConfigError
from instance_svc.expiry import TimeoutAction
from instance_svc.operator import contract
from instance_svc.runtime.kubevirt import parse_warm_pools, records
from instance_svc.states import State
from instance_svc.store import InstanceRecord, SnapshotRecord
from tests.support.kube_schemas import Invalid, load_crds, validate_against_crd

CRDS = load_crds()
INSTANCE_CRD = CRDS[(contract.GROUP, contract.INSTANCE_KIND)]
SNAPSHOT_CRD = CRDS[(contract.GROUP, contract.SNAPSHOT_KIND)]

BASE = InstanceRecord(
    id="i-0123456789ab",
    tenant="t1",
    template="base",
    vcpus=1,
    memory_mib=512,
    disk_mib=2048,
    state=State.PENDING,
    create_time_us=1_700_000_000_123_456,
    expire_time_us=1_700_000_300_123_456,
    timeout_us=300_000_000,
    timeout_action=TimeoutAction.TERMINATE,
    runtime="kubevirt",
    sandbox_id="i-0123456789ab",
)

SHAPES = {
    "default": BASE,
    "desktop, labels, request_id, pause at the deadline": replace(
        BASE,
        template="desktop",
        desktop=(1024, 768),
        labels={"team": "a", "run": "7"},
        request_id="Req_0123-abcd",
        timeout_action=TimeoutAction.PAUSE,
    ),
    "internet with egress": replace(
        BASE, internet=True, egress_allow=("203.0.113.0/24", "198.51.100.7"), egress_deny=("203.0.113.9",)
    ),
    "internet, every public address": replace(BASE, internet=True),
    "restored from a snapshot": replace(BASE, source_snapshot_id="s-00aa11bb22cc", disk_mib=4096),
}


@pytest.mark.parametrize("rec", SHAPES.values(), ids=SHAPES.keys())
def test_every_shape_validates_against_the_crd_and_round_trips(rec: InstanceRecord) -> None:
    obj = records.instance_object(rec, warm_pool="base")
    obj["metadata"]["namespace"] = "cyberdesk"
    validate_against_crd(obj, INSTANCE_CRD)
    assert records.record_of(obj) == rec
    assert obj["spec"]["deadline"] == "2023-11-14T22:18:20.123456Z"
    assert obj["metadata"]["labels"][contract.LABEL_TENANT] == rec.tenant
    # Restores never claim from a warm pool (the CRD's rule); the rest ask the pool named.
    assert obj["spec"].get("warmPool") == (None if rec.source_snapshot_id else "base")


def test_a_later_record_is_a_valid_update() -> None:
    old = records.instance_object(BASE)
    new = copy.deepcopy(old)
    running = replace(
        BASE, state=State.RUNNING, limits=[("vcpus", 1, "kubevirt")], expire_time_us=BASE.expire_time_us + 1
    )
    new["metadata"]["annotations"][records.RECORD] = records.record_json(running)
    new["spec"]["deadline"] = records.rfc3339(running.expire_time_us)
    new["spec"]["paused"] = True
    validate_against_crd(new, INSTANCE_CRD, old=old)
    assert records.record_of(new) == running


def test_the_crd_refuses_what_instance_svc_must_never_write() -> None:
    """The checks above can fail: an immutable field changed and a host name in egress are refused."""
    old = records.instance_object(BASE)
    resized = copy.deepcopy(old)
    resized["spec"]["resources"]["vcpu"] = 2
    with pytest.raises(Invalid):
        validate_against_crd(resized, INSTANCE_CRD, old=old)
    named = records.instance_object(replace(BASE, internet=True, egress_allow=("pypi.org",)))
    with pytest.raises(Invalid):
        validate_against_crd(named, INSTANCE_CRD)


def test_snapshot_objects_validate_and_round_trip() -> None:
    obj = records.snapshot_object("s-00aa11bb22cc", "t1", BASE.id, "before the upgrade")
    validate_against_crd(obj, SNAPSHOT_CRD)
    snap = SnapshotRecord("s-00aa11bb22cc", "t1", BASE.id, 1, 2, False, "base", "before the upgrade", "/x/s.tar")
    obj["metadata"]["annotations"] = {records.RECORD: records.snapshot_json(snap)}
    assert records.snapshot_of(obj) == snap


def test_request_labels_are_label_values_per_tenant() -> None:
    a = records.request_label("t1", "x" * 128)
    assert len(a) == 40 and a.isalnum()
    assert a != records.request_label("t2", "x" * 128)


def test_warm_pool_setting() -> None:
    assert parse_warm_pools("base=pool-a, desktop=pool-b") == (("base", "pool-a"), ("desktop", "pool-b"))
    assert parse_warm_pools("") == ()
    for bad in ("gpu=pool", "base=", "base"):
        with pytest.raises(ConfigError, match="CYBERDESK_KUBE_WARM_POOLS"):
            parse_warm_pools(bad)
