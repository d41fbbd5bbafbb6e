"""Warm-pool rules, pure (instance_svc/pool.py): which create shapes a pooled sandbox serves, the config."""

from __future__ import annotations

import pytest

from cyberdesk_common.config import ConfigError
from cyberdesk_proto.v1 import instance_pb2
from instance_svc import pool
from instance_svc.validation import MachineLimits, validate_create


def test_default_shapes_match_the_pool_and_others_start_cold() -> None:
    spec = validate_create(instance_pb2.CreateInstanceRequest(), MachineLimits())
    desk = validate_create(instance_pb2.CreateInstanceRequest(template="desktop"), MachineLimits())
    assert pool.matches(spec) and pool.matches(desk)
    assert not pool.matches(validate_create(instance_pb2.CreateInstanceRequest(vcpus=2), MachineLimits()))
    internet = instance_pb2.CreateInstanceRequest(network=instance_pb2.NETWORK_MODE_INTERNET)
    assert not pool.matches(validate_create(internet, MachineLimits()))


def test_warm_pool_config() -> None:
    assert pool.parse_sizes("base=2,desktop=0") == {"base": 2, "desktop": 0}
    assert pool.parse_sizes("") == {}
    with pytest.raises(ConfigError, match="CYBERDESK_WARM_POOL"):
        pool.parse_sizes("gpu=1")
    with pytest.raises(ConfigError, match="CYBERDESK_WARM_POOL"):
        pool.parse_sizes("base=two")
