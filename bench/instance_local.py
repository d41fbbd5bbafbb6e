"""Local runtime: cold create-to-ready latency, idle memory per sandbox, and how many idle sandboxes fit.

* cold create: `LocalRuntime.create` of a fresh sandbox until its agent answers gRPC health, one
  at a time (each is deleted before the next starts), N times.
* idle memory: IDLE sandboxes kept running together, measured after they settle: the sum over a
  sandbox's processes of RSS, and of PSS (/proc/<pid>/smaps_rollup: shared pages such as the
  Python interpreter's are divided among the processes that map them, which is the fair share).
* capacity: MemAvailable before the idle sandboxes were started divided by the measured PSS per
  sandbox. That figure is extrapolated, not a count of sandboxes actually started (IDLE are).
* disk: the part of a cold create and delete that the sandbox's own file system costs (sparse
  image, mkfs.ext4, loop mount; unmount and loop detach), timed alone with the same calls the
  runtime makes, interleaved with the cold creates; cold creates whose layer is a plain directory
  as before disks (the "before" row, interleaved too); and the host disk an idle sandbox's image
  really takes (allocated blocks), against its 2 GiB size.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

from bench._report import latency_summary, report
from instance_svc.runtime.base import SandboxSpec
from instance_svc.runtime.local import LocalOptions, LocalRuntime, disk

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


def _disk_once(base: Path, i: int) -> tuple[float, float]:
    directory = base / f"disk-only-{i}"
    directory.mkdir(mode=0o700)
    opts = LocalOptions()
    start = time.perf_counter()
    disk.create(directory, 2048, opts.sandbox_uid, opts.sandbox_gid)
    made = time.perf_counter()
    left = disk.release(directory)
    done = time.perf_counter()
    assert not left, left
    shutil.rmtree(directory)
    return (made - start) * 1000, (done - made) * 1000


def _plain_layer(directory: Path, size_mib: int, uid: int, gid: int) -> Path:
    """The layer as it was before disks, a directory on the host's file system: the "before" row only."""
    layer = directory / "layer"
    layer.mkdir(mode=0o755)
    return layer


async def _cold(runtime: LocalRuntime, base: Path) -> tuple[list[float], ...]:
    create_ms, delete_ms, disk_make_ms, disk_release_ms, plain_ms = [], [], [], [], []
    for i in range(N):
        # Interleaved with the real creates, so both see the same machine load.
        with mock.patch.object(disk, "create", _plain_layer):
            start = time.perf_counter()
            await runtime.create(SandboxSpec(sandbox_id=f"plain-{i}"))
            plain_ms.append((time.perf_counter() - start) * 1000)
        await runtime.delete(f"plain-{i}")
        made, released = await asyncio.to_thread(_disk_once, base, i)
        disk_make_ms.append(made)
        disk_release_ms.append(released)
        start = time.perf_counter()
        await runtime.create(SandboxSpec(sandbox_id=f"cold-{i}"))
        create_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        await runtime.delete(f"cold-{i}")
        delete_ms.append((time.perf_counter() - start) * 1000)
    return create_ms, delete_ms, disk_make_ms, disk_release_ms, plain_ms


async def _idle(runtime: LocalRuntime, base: Path) -> dict[str, float]:
    available_before = _mem_available_kib()
    ids = [f"idle-{i}" for i in range(IDLE)]
    for sandbox_id in ids:
        await runtime.create(SandboxSpec(sandbox_id=sandbox_id))
    await asyncio.sleep(3)  # let start-up garbage settle
    rss, pss, procs, disk_mib = [], [], [], []
    for sandbox_id in ids:
        disk_mib.append(disk.usage_bytes(base / sandbox_id / disk.IMAGE) / 1024 / 1024)
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
        "host_disk_mib_per_idle_sandbox": round(sum(disk_mib) / len(disk_mib), 2),
        "extrapolated_capacity": int(available_before / 1024 / pss_mib) if pss_mib else 0,
    }


async def _run(base: Path) -> tuple[list[list[float]], dict[str, float]]:
    runtime = LocalRuntime(base)
    try:
        series = list(await _cold(runtime, base))
        idle = await _idle(runtime, base)
    finally:
        for info in await runtime.list():
            await runtime.delete(info.sandbox_id)
        await runtime.close()
    return series, idle


def main() -> None:
    """Run the benchmark, print the table and write bench/results/instance_local.json."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-instance-local-"))
    try:
        (create_ms, delete_ms, disk_make_ms, disk_release_ms, plain_ms), idle = asyncio.run(_run(tmp / "instances"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        {"what": "cold create -> agent healthy", **latency_summary(create_ms)},
        {"what": "  the same, layer a plain directory (before disks)", **latency_summary(plain_ms)},
        {"what": "delete", **latency_summary(delete_ms)},
        {"what": "  of which disk: image + mkfs.ext4 + mount (2 GiB)", **latency_summary(disk_make_ms)},
        {"what": "  of which disk: unmount + loop detach", **latency_summary(disk_release_ms)},
    ]
    report("instance_local", rows, idle=idle)


if __name__ == "__main__":
    main()
