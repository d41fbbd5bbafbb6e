"""CreateInstanceRequest -> CreateSpec (instance_svc/validation.py): defaults, and errors naming the field."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from cyberdesk_proto.v1 import instance_pb2
from instance_svc.expiry import US, TimeoutAction
from instance_svc.validation import InvalidRequest, MachineLimits, validate_create


def _req(**kw: object) -> instance_pb2.CreateInstanceRequest:
    return instance_pb2.CreateInstanceRequest(**kw)  # type: ignore[arg-type]


def test_create_defaults() -> None:
    spec = validate_create(_req(), MachineLimits())
    assert (spec.template, spec.vcpus, spec.memory_mib, spec.timeout_us) == ("base", 1, 512, 300 * US)
    assert spec.timeout_action is TimeoutAction.TERMINATE and spec.desktop is None and not spec.internet
    desk = validate_create(_req(template="desktop"), MachineLimits())
    assert desk.desktop == (1280, 800)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_req(template="windows"), "template 'windows' is unknown"),
        (_req(vcpus=9), "vcpus must be between 1 and 8"),
        (_req(vcpus=-1), "vcpus"),
        (_req(memory_mib=64), "memory_mib must be between 128 and 16384"),
        (_req(timeout=duration_pb2.Duration(seconds=0, nanos=5)), "timeout must be between"),
        (_req(timeout=duration_pb2.Duration(seconds=90000)), "timeout must be between"),
        (_req(timeout_action=7), "timeout_action 7 is unknown"),
        (_req(env={"1BAD": "x"}), "env: '1BAD' is not a valid variable name"),
        (_req(env={"A=B": "x"}), "env: 'A=B'"),
        (_req(env={"CYBERDESK_AGENT_TOKEN": "x"}), "reserved"),
        (_req(env={"OK": "a\0b"}), "env[OK]"),
        (_req(labels={"Team": "x"}), "labels: key 'Team'"),
        (_req(labels={"team": "a b"}), "labels[team]"),
        (_req(desktop=instance_pb2.DesktopConfig(enabled=True, width=10, height=10)), "desktop: screen 10x10"),
        (_req(network=9), "network 9 is unknown"),
        (_req(request_id="r" * 129), "request_id must be 1 to 128 letters"),
        (_req(request_id="req 1"), "request_id must be 1 to 128 letters"),
        (_req(request_id="req/1"), "request_id"),
    ],
)
def test_create_rejects_bad_input_naming_the_field(request_: instance_pb2.CreateInstanceRequest, field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        validate_create(request_, MachineLimits())
    assert field in str(err.value)


def test_request_ids_a_client_would_send_are_accepted() -> None:
    for request_id in ("", "3f2b8c1e-9d4a-4f7e-8b21-0c6a5e9d7f10", "job_42-retry", "r" * 128):
        assert validate_create(_req(request_id=request_id), MachineLimits()).request_id == request_id
