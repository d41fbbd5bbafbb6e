"""Pure logic: expiry arithmetic, quota decisions, page tokens, create validation, pool matching."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from cyberdesk_common.config import ConfigError
from cyberdesk_proto.v1 import instance_pb2
from instance_svc import expiry, paging, pool, quotas
from instance_svc.expiry import US, TimeoutAction
from instance_svc.validation import InvalidRequest, MachineLimits, validate_create


def test_expiry_arithmetic() -> None:
    assert expiry.deadline(10 * US, 5 * US) == 15 * US
    assert expiry.delay_seconds(15 * US, 10 * US) == 5.0
    assert expiry.delay_seconds(10 * US, 15 * US) == 0.0  # passed: fire at once
    assert expiry.effective_action(TimeoutAction.PAUSE, supports_pause=False) is TimeoutAction.TERMINATE
    assert expiry.effective_action(TimeoutAction.PAUSE, supports_pause=True) is TimeoutAction.PAUSE
    assert expiry.effective_action(TimeoutAction.TERMINATE, supports_pause=True) is TimeoutAction.TERMINATE
    assert expiry.resume_deadline(20 * US, 10 * US, 7 * US) == 20 * US
    assert expiry.resume_deadline(5 * US, 10 * US, 7 * US) == 17 * US


@pytest.mark.parametrize(
    ("timeout_us", "ok"), [(US - 1, False), (US, True), (86400 * US, True), (86400 * US + 1, False)]
)
def test_timeout_bounds(timeout_us: int, ok: bool) -> None:
    problem = expiry.check_timeout(timeout_us)
    assert (problem is None) == ok
    if not ok:
        assert problem is not None and "timeout must be between 1s and 24h" in problem


LIMITS = quotas.Limits(instances=10, vcpus=20, memory_mib=20480)


@pytest.mark.parametrize(
    ("usage", "vcpus", "memory", "expected"),
    [
        (quotas.Usage(9, 9, 4608), 1, 512, None),
        (quotas.Usage(10, 10, 5120), 1, 512, "tenant t has 10 of 10 concurrent instances"),
        (quotas.Usage(5, 19, 2560), 2, 512, "tenant t uses 19 of 20 vCPUs; 2 more do not fit"),
        (quotas.Usage(5, 5, 20000), 1, 512, "tenant t uses 20000 of 20480 MiB of memory; 512 MiB more do not fit"),
        (quotas.Usage(5, 18, 19968), 2, 512, None),  # exactly at both limits
    ],
)
def test_quota_decisions(usage: quotas.Usage, vcpus: int, memory: int, expected: str | None) -> None:
    assert quotas.decide("t", usage, LIMITS, vcpus, memory) == expected


def test_quota_overrides() -> None:
    parsed = quotas.parse_overrides("big:instances=50,vcpus=100; small:memory_mib=1024", LIMITS)
    assert parsed["big"] == quotas.Limits(50, 100, 20480)
    assert parsed["small"] == quotas.Limits(10, 20, 1024)
    table = quotas.QuotaTable(LIMITS, parsed)
    assert table.for_tenant("other") == LIMITS
    with pytest.raises(ConfigError, match="QUOTA_OVERRIDES"):
        quotas.parse_overrides("x:cpus=3", LIMITS)
    with pytest.raises(ConfigError, match="QUOTA_OVERRIDES"):
        quotas.parse_overrides("no-colon", LIMITS)


def test_page_tokens_round_trip_and_reject_garbage() -> None:
    cursor = paging.Cursor(1_700_000_000_123_456, "i-abc")
    token = paging.encode(cursor, "i")
    assert paging.decode(token, "i") == cursor
    assert paging.decode("", "i") is None
    for bad in ("garbage", "x" * 7, paging.encode(cursor, "s"), "e30"):  # e30 = "{}"
        with pytest.raises(paging.BadPageRequest, match="page_token"):
            paging.decode(bad, "i")
    assert paging.page_size(0) == 50
    assert paging.page_size(5000) == 1000
    with pytest.raises(paging.BadPageRequest, match="page_size"):
        paging.page_size(-1)


def _req(**kw: object) -> instance_pb2.CreateInstanceRequest:
    return instance_pb2.CreateInstanceRequest(**kw)  # type: ignore[arg-type]


def test_create_defaults() -> None:
    spec = validate_create(_req(), MachineLimits())
    assert (spec.template, spec.vcpus, spec.memory_mib, spec.timeout_us) == ("base", 1, 512, 300 * US)
    assert spec.timeout_action is TimeoutAction.TERMINATE and spec.desktop is None and not spec.internet
    desk = validate_create(_req(template="desktop"), MachineLimits())
    assert desk.desktop == (1280, 800)
    assert pool.matches(spec) and pool.matches(desk)
    assert not pool.matches(validate_create(_req(vcpus=2), MachineLimits()))
    assert not pool.matches(validate_create(_req(network=instance_pb2.NETWORK_MODE_INTERNET), MachineLimits()))


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
        (_req(request_id="r" * 129), "request_id"),
    ],
)
def test_create_rejects_bad_input_naming_the_field(request_: instance_pb2.CreateInstanceRequest, field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        validate_create(request_, MachineLimits())
    assert field in str(err.value)


def test_warm_pool_config() -> None:
    assert pool.parse_sizes("base=2,desktop=0") == {"base": 2, "desktop": 0}
    assert pool.parse_sizes("") == {}
    with pytest.raises(ConfigError, match="CYBERDESK_WARM_POOL"):
        pool.parse_sizes("gpu=1")
    with pytest.raises(ConfigError, match="CYBERDESK_WARM_POOL"):
        pool.parse_sizes("base=two")
