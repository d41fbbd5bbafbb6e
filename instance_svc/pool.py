"""Warm pool: sandboxes started ahead of demand, one list per template.

A pooled sandbox runs an agent bound to no instance. A create whose resources match the pool's
shape claims one and binds it (ConfigureAgent: instance id and env), which takes milliseconds
instead of a cold start; a background task starts a replacement. Creates that ask for something
the pooled sandboxes were not started with (more vCPUs or memory, a different screen, internet,
a snapshot to restore) start cold, because limits and mounts are fixed when a sandbox starts.
That includes the disk: pooled sandboxes have their template's default size, and a create asking
for another size starts cold rather than resizing at claim (growing an ext4 image online would
work, but costs a truncate, a loop resize and resize2fs on the claim's millisecond path, and a
disk can never shrink online).

Pooled sandboxes are not recorded in the database: after a restart they are orphans, destroyed by
the start-up sweep (also one whose start a crash cut short), and the pool refills. A pooled
sandbox that dies while idle is dropped and deleted at once (the runtime's exit watch), so no
create claims a dead one and nothing of it stays on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass

from cyberdesk_common.config import ConfigError
from instance_svc import agent_client
from instance_svc.runtime.base import Runtime, SandboxInfo, SandboxSpec
from instance_svc.validation import DEFAULT_SCREEN, TEMPLATE_DISK_MIB, TEMPLATES, CreateSpec

_log = logging.getLogger("instance_svc.pool")

POOL_VCPUS = 1
POOL_MEMORY_MIB = 512


def parse_sizes(text: str) -> dict[str, int]:
    """CYBERDESK_WARM_POOL, e.g. "base=2,desktop=0"."""
    sizes: dict[str, int] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        name, _, value = item.partition("=")
        if name not in TEMPLATES or not value.isdigit():
            raise ConfigError(f"CYBERDESK_WARM_POOL: {item!r} is not template=N with template one of {TEMPLATES}")
        sizes[name] = int(value)
    return sizes


def pool_spec(template: str) -> SandboxSpec:
    """The shape of a pooled sandbox of `template`."""
    return SandboxSpec(
        sandbox_id="p-" + secrets.token_hex(6),
        template=template,
        vcpus=POOL_VCPUS,
        memory_mib=POOL_MEMORY_MIB,
        disk_mib=TEMPLATE_DISK_MIB[template],
        desktop=DEFAULT_SCREEN if template == "desktop" else None,
    )


def matches(spec: CreateSpec) -> bool:
    """Whether a pooled sandbox can serve `spec` (pure)."""
    return (
        spec.vcpus == POOL_VCPUS
        and spec.memory_mib == POOL_MEMORY_MIB
        and spec.disk_mib == TEMPLATE_DISK_MIB[spec.template]
        and not spec.internet
        and not spec.snapshot_id
        and spec.desktop == (DEFAULT_SCREEN if spec.template == "desktop" else None)
    )


@dataclass
class _Slot:
    ready: list[SandboxInfo]
    target: int
    starting: int = 0


class WarmPool:
    """Keeps `sizes[template]` idle sandboxes ready per template."""

    def __init__(self, runtime: Runtime, sizes: dict[str, int]) -> None:
        self._runtime = runtime
        self._slots = {t: _Slot([], n) for t, n in sizes.items() if n > 0}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._deletes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Start filling (inside the running loop)."""
        self._task = asyncio.create_task(self._refill(), name="warm-pool")
        self._wake.set()

    def ready(self, template: str) -> int:
        """How many idle sandboxes of `template` are ready."""
        slot = self._slots.get(template)
        return len(slot.ready) if slot else 0

    async def claim(self, spec: CreateSpec, instance_id: str) -> SandboxInfo | None:
        """A pooled sandbox bound to `instance_id`, or None (start cold)."""
        slot = self._slots.get(spec.template)
        if slot is None or not matches(spec):
            return None
        while slot.ready:
            info = slot.ready.pop(0)
            self._wake.set()
            try:
                await agent_client.configure(info.endpoint, instance_id, spec.env)
                return info
            except Exception as err:  # a broken pooled sandbox must not fail the create
                _log.warning("pooled sandbox unusable", extra={"sandbox_id": info.sandbox_id, "error": str(err)})
                with contextlib.suppress(Exception):
                    await self._runtime.delete(info.sandbox_id)
        return None

    async def _refill(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            for template, slot in self._slots.items():
                while len(slot.ready) + slot.starting < slot.target:
                    slot.starting += 1
                    try:
                        info = await self._runtime.create(pool_spec(template))
                        slot.ready.append(info)
                        self._runtime.watch(info.sandbox_id, self._died)
                        failures = 0
                    except Exception as err:
                        failures += 1
                        _log.warning("warm-pool start failed", extra={"template": template, "error": str(err)})
                        # Back off, then try again: the host may be short of memory for a while.
                        await asyncio.sleep(min(30.0, 0.5 * 2**failures))
                        self._wake.set()
                        break
                    finally:
                        slot.starting -= 1

    def _died(self, sandbox_id: str, reason: str) -> None:
        for template, slot in self._slots.items():
            idle = [info for info in slot.ready if info.sandbox_id == sandbox_id]
            if not idle:
                continue  # claimed meanwhile: its instance's watch reports it
            slot.ready.remove(idle[0])
            extra = {"template": template, "sandbox_id": sandbox_id, "reason": reason}
            _log.warning("pooled sandbox died", extra=extra)
            task = asyncio.get_running_loop().create_task(self._delete(sandbox_id))
            self._deletes.add(task)
            task.add_done_callback(self._deletes.discard)
            self._wake.set()

    async def _delete(self, sandbox_id: str) -> None:
        with contextlib.suppress(Exception):
            await self._runtime.delete(sandbox_id)

    async def stop(self) -> None:
        """Stop refilling and delete the idle sandboxes (they hold no instance)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._deletes, return_exceptions=True)
        for slot in self._slots.values():
            for info in slot.ready:
                with contextlib.suppress(Exception):
                    await self._runtime.delete(info.sandbox_id)
            slot.ready.clear()
