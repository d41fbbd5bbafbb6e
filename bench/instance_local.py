"""Local runtime: cold create-to-ready latency, idle memory per sandbox, and how many idle sandboxes fit.

* cold create: `LocalRuntime.create` of a fresh sandbox until its agent answers gRPC health, one
  at a time (each is deleted before the next starts), N times.
* idle memory: IDLE sandboxes kept running together, measured after they settle: the sum over a
  sandbox's processes of RSS, and of PSS (/proc/<pid>/smaps_rollup: shared pages such as the
  Python interpreter's are divided among the processes that map them, which is the fair share).
* capacity: MemAvailable before the idle sandboxes were started divided by the measured PSS per
  sandbox. That figure is extrapolated, not a count of sandboxes actually started (IDLE are).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench._report import latency_summary, report
from instance_svc.runtime.base import SandboxSpec
from instance_svc.runtime.local import LocalRuntime

N = int(os.environ.get("BENCH_N", "20"))
IDLE = int(os.environ.get("BENCH_IDLE", "50"))


def _kib(pid: int, key: str, path: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


async def _cold(runtime: LocalRuntime) -> tuple[list[float], list[float]]:
    create_ms, delete_ms = [], []
    for i in range(N):
        start = time.perf_counter()
        await runtime.create(SandboxSpec(sandbox_id=f"cold-{i}"))
        create_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        await runtime.delete(f"cold-{i}")
        delete_ms.append((time.perf_counter() - start) * 1000)
    return create_ms, delete_ms


async def _idle(runtime: LocalRuntime) -> dict[str, float]:
    available_before = _mem_available_kib()
    ids = [f"idle-{i}" for i in range(IDLE)]
    for sandbox_id in ids:
        await runtime.create(SandboxSpec(sandbox_id=sandbox_id))
    await asyncio.sleep(3)  # let start-up garbage settle
    rss, pss, procs = [], [], []
    for sandbox_id in ids:
        pids = runtime.pids(sandbox_id)
        procs.append(len(pids))
        rss.append(sum(_kib(pid, "VmRSS", "status") for pid in pids) / 1024)
        pss.append(sum(_kib(pid, "Pss", "smaps_rollup") for pid in pids) / 1024)
    available_after = _mem_available_kib()
    for sandbox_id in ids:
        await runtime.delete(sandbox_id)
    pss_mib = sum(pss) / len(pss)
    return {
        "idle_sandboxes": IDLE,
        "processes_per_sandbox": max(procs),
        "rss_mib_per_sandbox": round(sum(rss) / len(rss), 1),
        "pss_mib_per_sandbox": round(pss_mib, 1),
        "memavailable_drop_mib_per_sandbox": round((available_before - available_after) / 1024 / IDLE, 1),
        "mem_available_mib": round(available_before / 1024),
        "extrapolated_capacity": int(available_before / 1024 / pss_mib) if pss_mib else 0,
    }


async def _run(base: Path) -> tuple[list[float], list[float], dict[str, float]]:
    runtime = LocalRuntime(base)
    try:
        create_ms, delete_ms = await _cold(runtime)
        idle = await _idle(runtime)
    finally:
        for info in await runtime.list():
            await runtime.delete(info.sandbox_id)
        await runtime.close()
    return create_ms, delete_ms, idle


def main() -> None:
    """Run the benchmark, print the table and write bench/results/instance_local.json."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-instance-local-"))
    try:
        create_ms, delete_ms, idle = asyncio.run(_run(tmp / "instances"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        {"what": "cold create -> agent healthy", **latency_summary(create_ms)},
        {"what": "delete", **latency_summary(delete_ms)},
    ]
    report("instance_local", rows, idle=idle)


if __name__ == "__main__":
    main()
