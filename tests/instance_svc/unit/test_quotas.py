"""Per-tenant quota decisions and overrides (instance_svc/quotas.py), pure."""

from __future__ import annotations

import pytest

from cyberdesk_common.config import ConfigError
from instance_svc import quotas

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
