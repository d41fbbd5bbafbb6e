"""What the operator keeps while it runs: its client, settings, and how a watch event wakes a reconciler.

Each CyberdeskInstance, CyberdeskWarmPool and CyberdeskSnapshot has one reconciler (a kopf daemon)
that sleeps until something about its object changes: the object itself, its VM or VMI, its
snapshot or restore. Events find the reconciler through `wake(namespace, name)`; the reconciler
reads the current state from kopf's indexes (no API read), acts, and sleeps again, with a timeout
only when a deadline or a retry is due. That is the timer of the expiry: armed from the spec,
re-armed whenever the object changes and when the operator restarts (the daemon starts again).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cyberdesk_common.config import env_float, env_str
from instance_svc.operator import contract
from instance_svc.operator.kube import Kube


@dataclass(frozen=True)
class Settings:
    namespace: str
    operator_id: str
    agent_timeout: float
    retry_max: float

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            namespace=env_str("OPERATOR_NAMESPACE", contract.DEFAULT_NAMESPACE),
            operator_id=env_str("OPERATOR_ID", f"{socket.gethostname()}-{os.getpid()}"),
            agent_timeout=env_float("OPERATOR_AGENT_TIMEOUT", 3.0),
            retry_max=env_float("OPERATOR_RETRY_MAX", 2.0),
        )


@dataclass
class OperatorState:
    kube: Kube
    settings: Settings
    _wakers: dict[tuple[str, str, str], asyncio.Event] = field(default_factory=dict)
    # (namespace, VM) -> the instance it serves / the pool it was in: whom a VM or VMI event wakes.
    vm_instances: dict[tuple[str, str], str] = field(default_factory=dict)
    member_pools: dict[tuple[str, str], str] = field(default_factory=dict)
    # The live bodies kopf keeps for the warm pools' daemons (a claim reads the pool from here), and
    # templates read recently (they change rarely; a minute-old copy is good enough to build a VM).
    pools: dict[tuple[str, str], Any] = field(default_factory=dict)
    templates: dict[tuple[str, str], tuple[float, dict[str, Any]]] = field(default_factory=dict)

    def waker(self, kind: str, namespace: str | None, name: str) -> asyncio.Event:
        key = (kind, namespace or "", name)
        event = self._wakers.get(key)
        if event is None:
            event = self._wakers[key] = asyncio.Event()
        return event

    def forget(self, kind: str, namespace: str | None, name: str) -> None:
        self._wakers.pop((kind, namespace or "", name), None)

    def wake(self, kind: str, namespace: str | None, name: str) -> None:
        event = self._wakers.get((kind, namespace or "", name))
        if event is not None:
            event.set()

    async def sleep(self, kind: str, namespace: str | None, name: str, seconds: float | None) -> None:
        """Until woken or `seconds` pass (None: until woken)."""
        event = self.waker(kind, namespace, name)
        if not event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), seconds)
        event.clear()


INSTANCE = "instance"
POOL = "pool"
SNAPSHOT = "snapshot"


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def rfc3339(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime.datetime:
    parsed = datetime.datetime.fromisoformat(value.replace("z", "Z"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def condition(
    type_: str, ok: bool | None, reason: str, message: str, previous: Mapping[str, Any] | None, generation: int
) -> dict[str, Any]:
    """A condition; lastTransitionTime is kept while the status does not change."""
    status = "Unknown" if ok is None else ("True" if ok else "False")
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == status else None
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or rfc3339(now()),
        "observedGeneration": generation,
    }
