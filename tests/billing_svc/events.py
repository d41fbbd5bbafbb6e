"""Synthetic lifecycles with usage known in closed form, for the meter and billing_svc tests and the bench.

Instance j of tenant `t-(j % tenants)` is RUNNING for `run1` s, PAUSED for `pause` s, RUNNING for
`run2` s, then ends. Every change happens at half a second past a whole second, so under the
rounding rule each stretch of k seconds is billed exactly k seconds: the expected totals are sums
of the generator's own numbers, not the ledger's arithmetic again.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass

from cyberdesk_common.lifecycle_events import InstanceState as S
from cyberdesk_common.lifecycle_events import LifecycleEvent

US = 1_000_000
T0 = 1_764_547_200 * US  # a whole second (2025-12-01T00:00:00Z)


@dataclass
class Expected:
    """What each tenant used, by construction."""

    running: dict[str, int]
    paused: dict[str, int]
    vcpu: dict[str, int]


def lifecycles(instances: int, tenants: int = 10, prefix: str = "i") -> tuple[list[LifecycleEvent], Expected]:
    """The events of `instances` lifecycles (7 each), in publication order per instance, and the totals."""
    events: list[LifecycleEvent] = []
    running: dict[str, int] = defaultdict(int)
    paused: dict[str, int] = defaultdict(int)
    vcpu: dict[str, int] = defaultdict(int)
    for j in range(instances):
        tenant, iid = f"t-{j % tenants}", f"{prefix}-{j:08d}"
        vcpus, run1, pause, run2 = 1 + j % 4, 1 + j % 7, j % 5, 1 + j % 3
        start = T0 + (j % 3600) * US + US // 2
        times = [
            (S.PENDING, start - 300_000),
            (S.STARTING, start - 200_000),
            (S.RUNNING, start),
            (S.PAUSED, start + run1 * US),
            (S.RUNNING, start + (run1 + pause) * US),
            (S.STOPPING, start + (run1 + pause + run2) * US),
            (S.TERMINATED, start + (run1 + pause + run2) * US + 100_000),
        ]
        for state, at in times:
            events.append(
                LifecycleEvent(str(uuid.uuid4()), tenant, iid, None, state, at, vcpus, 512, "base", "", 1024, False)
            )
        running[tenant] += run1 + run2
        paused[tenant] += pause
        vcpu[tenant] += (run1 + run2) * vcpus
    return events, Expected(dict(running), dict(paused), dict(vcpu))
