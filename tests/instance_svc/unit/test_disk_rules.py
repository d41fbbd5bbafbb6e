"""The pure rules of instance disks: defaults and bounds, the tenant's disk quota, the warm pool's shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from cyberdesk_common.config import ConfigError
from cyberdesk_proto.v1 import instance_pb2
from instance_svc import pool, quotas
from instance_svc.runtime.base import RuntimeError_
from instance_svc.runtime.local import disk
from instance_svc.validation import TEMPLATE_DISK_MIB, InvalidRequest, MachineLimits, validate_create


def _req(**kw: object) -> instance_pb2.CreateInstanceRequest:
    return instance_pb2.CreateInstanceRequest(**kw)  # type: ignore[arg-type]


def test_each_template_has_a_default_disk_and_a_request_may_name_its_own() -> None:
    base = validate_create(_req(), MachineLimits())
    assert (base.disk_mib, base.disk_mib_requested) == (2048, False)
    desktop = validate_create(_req(template="desktop"), MachineLimits())
    assert desktop.disk_mib == TEMPLATE_DISK_MIB["desktop"] == 4096
    # A base instance with a screen keeps the base template's disk.
    assert validate_create(_req(desktop=instance_pb2.DesktopConfig(enabled=True)), MachineLimits()).disk_mib == 2048
    own = validate_create(_req(disk_mib=256), MachineLimits())
    assert (own.disk_mib, own.disk_mib_requested) == (256, True)


@pytest.mark.parametrize("size", [-1, 1, 255, 65537])
def test_a_disk_out_of_bounds_is_invalid_naming_the_field(size: int) -> None:
    with pytest.raises(InvalidRequest) as err:
        validate_create(_req(disk_mib=size), MachineLimits())
    assert str(err.value) == f"disk_mib must be between 256 and 65536, got {size}"


def test_the_deployment_sets_the_largest_disk() -> None:
    assert validate_create(_req(disk_mib=1024), MachineLimits(max_disk_mib=1024)).disk_mib == 1024
    with pytest.raises(InvalidRequest, match="disk_mib must be between 256 and 1024, got 1025"):
        validate_create(_req(disk_mib=1025), MachineLimits(max_disk_mib=1024))


LIMITS = quotas.Limits(instances=10, vcpus=20, memory_mib=20480, disk_mib=8192)


@pytest.mark.parametrize(
    ("usage", "disk_mib", "expected"),
    [
        (quotas.Usage(1, 1, 512, 6144), 2048, None),  # exactly at the limit
        (quotas.Usage(1, 1, 512, 6144), 2049, "tenant t uses 6144 of 8192 MiB of disk; 2049 MiB more do not fit"),
        (quotas.Usage(0, 0, 0, 0), 8193, "tenant t uses 0 of 8192 MiB of disk; 8193 MiB more do not fit"),
    ],
)
def test_disk_quota_decisions(usage: quotas.Usage, disk_mib: int, expected: str | None) -> None:
    assert quotas.decide("t", usage, LIMITS, 1, 512, disk_mib) == expected


def test_disk_quota_defaults_and_overrides() -> None:
    assert quotas.Limits().disk_mib == 40960
    parsed = quotas.parse_overrides("big:disk_mib=102400;small:instances=2", LIMITS)
    assert parsed["big"] == quotas.Limits(10, 20, 20480, 102400)
    assert parsed["small"].disk_mib == 8192  # the default's, not zero
    with pytest.raises(ConfigError, match="disk_mib=N"):
        quotas.parse_overrides("x:disk=3", LIMITS)


def test_pooled_sandboxes_have_the_template_disk_and_other_sizes_start_cold() -> None:
    assert pool.pool_spec("base").disk_mib == 2048 and pool.pool_spec("desktop").disk_mib == 4096
    assert pool.matches(validate_create(_req(), MachineLimits()))
    assert pool.matches(validate_create(_req(disk_mib=2048), MachineLimits()))
    assert not pool.matches(validate_create(_req(disk_mib=4096), MachineLimits()))
    assert pool.matches(validate_create(_req(template="desktop"), MachineLimits()))
    assert not pool.matches(validate_create(_req(template="desktop", disk_mib=2048), MachineLimits()))


def test_mountinfo_paths_are_unescaped() -> None:
    assert disk._unescape(r"/state\040dir/instances/sb-a/layer") == "/state dir/instances/sb-a/layer"
    assert disk._unescape(r"/a\134b\011c") == "/a\\b\tc"
    assert disk._unescape("/plain/path") == "/plain/path"
    assert disk._unescape("/ends/with\\04") == "/ends/with\\04"  # not a whole escape: kept


def test_a_missing_mkfs_is_a_runtime_error_saying_what_to_install() -> None:
    with pytest.raises(RuntimeError_, match=r"cannot format the 256 MiB disk: /nonexistent/mkfs.ext4 is not installed"):
        disk._run(["/nonexistent/mkfs.ext4", "-q"], "format the 256 MiB disk")


def test_a_failing_tool_names_what_failed_without_the_host_path(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError_) as err:
        disk._run(["sh", "-c", f"echo 'mount: {tmp_path}/layer: bad superblock' >&2; exit 32"], "mount it", tmp_path)
    assert str(err.value) == "cannot mount it: mount: <sandbox>/layer: bad superblock"
