"""Per-tenant quota decisions (pure). The store applies them inside one write transaction."""

from __future__ import annotations

from dataclasses import dataclass

from cyberdesk_common.config import ConfigError, env_int, env_str


@dataclass(frozen=True)
class Limits:
    """What one tenant may hold at once, counted over non-terminal instances."""

    instances: int = 10
    vcpus: int = 20
    memory_mib: int = 20480
    # 20 instances of the base template's 2 GiB: disks are sparse, so this bounds what the
    # tenant can make the host's disk hold, not what it holds while idle.
    disk_mib: int = 40960


@dataclass(frozen=True)
class Usage:
    """What a tenant holds now."""

    instances: int = 0
    vcpus: int = 0
    memory_mib: int = 0
    disk_mib: int = 0


def decide(tenant: str, usage: Usage, limits: Limits, vcpus: int, memory_mib: int, disk_mib: int = 0) -> str | None:
    """None when one more instance of `vcpus`/`memory_mib`/`disk_mib` fits, else a message naming the limit."""
    if usage.instances + 1 > limits.instances:
        return f"tenant {tenant} has {usage.instances} of {limits.instances} concurrent instances"
    if usage.vcpus + vcpus > limits.vcpus:
        return f"tenant {tenant} uses {usage.vcpus} of {limits.vcpus} vCPUs; {vcpus} more do not fit"
    if usage.memory_mib + memory_mib > limits.memory_mib:
        return (
            f"tenant {tenant} uses {usage.memory_mib} of {limits.memory_mib} MiB of memory; "
            f"{memory_mib} MiB more do not fit"
        )
    if usage.disk_mib + disk_mib > limits.disk_mib:
        return f"tenant {tenant} uses {usage.disk_mib} of {limits.disk_mib} MiB of disk; {disk_mib} MiB more do not fit"
    return None


def parse_overrides(text: str, default: Limits) -> dict[str, Limits]:
    """Per-tenant overrides: "t1:instances=50,vcpus=100;t2:memory_mib=65536,disk_mib=102400"."""
    result: dict[str, Limits] = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        tenant, sep, body = entry.partition(":")
        if not sep or not tenant.strip():
            raise ConfigError(f"CYBERDESK_QUOTA_OVERRIDES entry {entry!r} is not 'tenant:name=value,...'")
        values = {
            "instances": default.instances,
            "vcpus": default.vcpus,
            "memory_mib": default.memory_mib,
            "disk_mib": default.disk_mib,
        }
        for item in filter(None, (i.strip() for i in body.split(","))):
            name, _, value = item.partition("=")
            if name not in values or not value.isdigit():
                raise ConfigError(
                    f"CYBERDESK_QUOTA_OVERRIDES: {item!r} for tenant {tenant} is not one of "
                    "instances=N, vcpus=N, memory_mib=N, disk_mib=N"
                )
            values[name] = int(value)
        result[tenant.strip()] = Limits(**values)
    return result


class QuotaTable:
    """Default limits plus per-tenant overrides, read from the environment."""

    def __init__(self, default: Limits, overrides: dict[str, Limits] | None = None) -> None:
        self.default = default
        self.overrides = overrides or {}

    @classmethod
    def from_env(cls) -> QuotaTable:
        """CYBERDESK_QUOTA_INSTANCES / _VCPUS / _MEMORY_MIB / _DISK_MIB and CYBERDESK_QUOTA_OVERRIDES."""
        default = Limits(
            instances=env_int("QUOTA_INSTANCES", 10, minimum=0),
            vcpus=env_int("QUOTA_VCPUS", 20, minimum=0),
            memory_mib=env_int("QUOTA_MEMORY_MIB", 20480, minimum=0),
            disk_mib=env_int("QUOTA_DISK_MIB", 40960, minimum=0),
        )
        return cls(default, parse_overrides(env_str("QUOTA_OVERRIDES", ""), default))

    def for_tenant(self, tenant: str) -> Limits:
        """The limits of `tenant`."""
        return self.overrides.get(tenant, self.default)
