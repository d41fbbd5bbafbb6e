"""The warm pool (instance_svc/pool.py) over a FakeRuntime: it fills to its size, serves only its
shape, and a graceful stop deletes the idle sandboxes (they belong to no instance)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from instance_svc.expiry import US, TimeoutAction
from instance_svc.pool import POOL_MEMORY_MIB, POOL_VCPUS, WarmPool
from instance_svc.validation import DEFAULT_SCREEN, CreateSpec
from tests.instance_svc.fakes import FakeRuntime, settle

SPEC = CreateSpec(template="base", vcpus=1, memory_mib=512, timeout_us=300 * US, timeout_action=TimeoutAction.TERMINATE)


async def _scenario() -> None:
    runtime = FakeRuntime()
    pool = WarmPool(runtime, {"base": 2, "desktop": 1})
    pool.start()
    await settle(until=lambda: pool.ready("base") == 2 and pool.ready("desktop") == 1)
    specs = [box.spec for box in runtime.sandboxes.values()]
    assert all(s.sandbox_id.startswith("p-") and s.instance_id == "" for s in specs)  # bound to no instance
    assert all((s.vcpus, s.memory_mib) == (POOL_VCPUS, POOL_MEMORY_MIB) for s in specs)
    assert sorted((s.template, s.desktop) for s in specs) == [
        ("base", None),
        ("base", None),
        ("desktop", DEFAULT_SCREEN),
    ]
    # Another shape starts cold: the pool is not touched.
    assert await pool.claim(replace(SPEC, vcpus=2), "i-1") is None
    assert await pool.claim(replace(SPEC, template="gpu"), "i-1") is None
    assert pool.ready("base") == 2
    await pool.stop()
    assert runtime.sandboxes == {} and pool.ready("base") == 0


def test_the_pool_fills_serves_only_its_shape_and_stop_deletes_idle_sandboxes() -> None:
    asyncio.run(_scenario())
