"""Plan decisions (billing_svc/plans.py), pure: each limit refuses with its code, value and usage."""

from __future__ import annotations

import grpc

from billing_svc import plans
from billing_svc.plans import Held

FREE = plans.CATALOG["free"]


def test_fits() -> None:
    assert plans.decide_create("t", FREE, Held(), 1, 512, 2048, False, 600) is None


def test_each_limit_names_itself() -> None:
    one = plans.decide_create("t", FREE, Held(instances=1, vcpus=1, memory_mib=512), 1, 512, 2048, False, 600)
    assert one is not None and (one.code, one.limit, one.value, one.used) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "instances",
        1,
        1,
    )
    assert one.message == 'plan "free" allows 1 concurrent instances; tenant t has 1 (1 more asked for)'
    cpu = plans.decide_create("t", FREE, Held(), 4, 512, 2048, False, 600)
    assert cpu is not None and (cpu.limit, cpu.value, cpu.requested) == ("vcpus", 2, 4)
    desk = plans.decide_create("t", FREE, Held(), 1, 512, 2048, True, 600)
    assert desk is not None and (desk.code, desk.limit) == (grpc.StatusCode.FAILED_PRECONDITION, "desktops")
    long = plans.decide_create("t", FREE, Held(), 1, 512, 2048, False, 7200)
    assert long is not None and (long.code, long.limit, long.value, long.used) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "max_timeout_seconds",
        3600,
        7200,
    )
    spent = plans.decide_create("t", FREE, Held(monthly_instance_seconds=36000), 1, 512, 2048, False, 60)
    assert spent is not None and (spent.limit, spent.value, spent.used) == ("monthly_instance_seconds", 36000, 36000)
    assert "36000" in spent.message


def test_timeout_decision() -> None:
    assert plans.decide_timeout("t", FREE, Held(), 3600) is None
    refused = plans.decide_timeout("t", FREE, Held(), 3601)
    assert refused is not None and refused.limit == "max_timeout_seconds"
    unlimited = plans.named("free", monthly_instance_seconds=0)
    assert plans.decide_timeout("t", unlimited, Held(monthly_instance_seconds=10**9), 60) is None
