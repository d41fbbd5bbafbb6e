"""Plans (the catalog, the default plan) and the admission decisions against them (pure).

The ledger applies `decide_create` inside the write transaction that also inserts the
reservation, so the usage it decides on cannot change between the decision and the insert.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import grpc

from cyberdesk_common.config import ConfigError, env_str

MONTHLY = "monthly_instance_seconds"


class CreditPolicy(enum.Enum):
    """What happens to running instances once the monthly allowance is used up (`cyberdesk.v1.CreditPolicy`)."""

    PAUSE = 1
    TERMINATE = 2
    REFUSE_NEW = 3


@dataclass(frozen=True)
class Plan:
    """A tenant's limits (the `cyberdesk.v1.Plan` message)."""

    name: str
    max_instances: int
    max_vcpus: int
    max_memory_mib: int
    max_disk_mib: int
    monthly_instance_seconds: int  # 0: unlimited
    max_timeout_s: int
    desktops_allowed: bool
    credit_policy: CreditPolicy = CreditPolicy.PAUSE
    credit_grace_s: int = 60


_HOUR = 3600
CATALOG: dict[str, Plan] = {
    # The local stack's default: roomy, unlimited hours; the host's own quotas (instance_svc) bind first.
    "local": Plan("local", 50, 64, 65536, 262144, 0, 24 * _HOUR, True),
    "free": Plan("free", 1, 2, 2048, 10240, 10 * _HOUR, _HOUR, False, CreditPolicy.PAUSE, 60),
    "pro": Plan("pro", 20, 40, 81920, 409600, 1000 * _HOUR, 24 * _HOUR, True, CreditPolicy.PAUSE, 300),
}


def default_plan() -> Plan:
    """The plan of tenants without one: CYBERDESK_BILLING_DEFAULT_PLAN (a catalog name, default "local")."""
    name = env_str("BILLING_DEFAULT_PLAN", "local")
    if name not in CATALOG:
        raise ConfigError(f"CYBERDESK_BILLING_DEFAULT_PLAN={name!r}: use one of {', '.join(sorted(CATALOG))}")
    return CATALOG[name]


def named(name: str, **overrides: object) -> Plan:
    """A catalog plan, with some limits changed (KeyError for an unknown name)."""
    return replace(CATALOG[name], **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Held:
    """What a tenant holds now: live instances (and reservations), and its RUNNING seconds this month."""

    instances: int = 0
    vcpus: int = 0
    memory_mib: int = 0
    disk_mib: int = 0
    desktops: int = 0
    monthly_instance_seconds: int = 0


@dataclass(frozen=True)
class Refusal:
    """Why a plan refuses: the limit, its value, the usage and what was asked (the proto's Refusal)."""

    code: grpc.StatusCode
    limit: str
    value: int
    used: int
    requested: int
    message: str


def _exhausted(tenant: str, plan: Plan, held: Held) -> Refusal | None:
    if plan.monthly_instance_seconds and held.monthly_instance_seconds >= plan.monthly_instance_seconds:
        return Refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            MONTHLY,
            plan.monthly_instance_seconds,
            held.monthly_instance_seconds,
            0,
            f'plan "{plan.name}" includes {plan.monthly_instance_seconds} instance-seconds a month; tenant {tenant} '
            f"has used {held.monthly_instance_seconds}. More comes with the next month or a larger plan",
        )
    return None


def _timeout(tenant: str, plan: Plan, timeout_s: int) -> Refusal | None:
    if timeout_s > plan.max_timeout_s:
        return Refusal(
            grpc.StatusCode.FAILED_PRECONDITION,
            "max_timeout_seconds",
            plan.max_timeout_s,
            timeout_s,
            timeout_s,
            f'plan "{plan.name}" allows timeouts of at most {plan.max_timeout_s} s; {timeout_s} s was asked for '
            f"(tenant {tenant})",
        )
    return None


def decide_create(
    tenant: str, plan: Plan, held: Held, vcpus: int, memory_mib: int, disk_mib: int, desktop: bool, timeout_s: int
) -> Refusal | None:
    """None when one more instance of these resources fits the plan, else the first limit it breaks."""
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    if desktop and not plan.desktops_allowed:
        return Refusal(
            grpc.StatusCode.FAILED_PRECONDITION,
            "desktops",
            0,
            held.desktops,
            1,
            f'plan "{plan.name}" does not include desktops (tenant {tenant}); create without a desktop or '
            "move to a plan with them",
        )
    too_long = _timeout(tenant, plan, timeout_s)
    if too_long:
        return too_long
    counted = (
        ("instances", plan.max_instances, held.instances, 1, "concurrent instances"),
        ("vcpus", plan.max_vcpus, held.vcpus, vcpus, "vCPUs"),
        ("memory_mib", plan.max_memory_mib, held.memory_mib, memory_mib, "MiB of memory"),
        ("disk_mib", plan.max_disk_mib, held.disk_mib, disk_mib, "MiB of disk"),
    )
    for limit, value, used, asked, unit in counted:
        if used + asked > value:
            return Refusal(
                exhausted,
                limit,
                value,
                used,
                asked,
                f'plan "{plan.name}" allows {value} {unit}; tenant {tenant} has {used} ({asked} more asked for)',
            )
    return _exhausted(tenant, plan, held)


def decide_timeout(tenant: str, plan: Plan, held: Held, timeout_s: int) -> Refusal | None:
    """None when the instance's deadline may move to now + timeout_s."""
    return _timeout(tenant, plan, timeout_s) or _exhausted(tenant, plan, held)
