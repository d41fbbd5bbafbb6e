"""Snapshots of the local runtime: the writable layer archived with tar while the sandbox is frozen.

Archives are zstd where the zstd binary exists, gzip otherwise; restore detects which from the
magic bytes. Only files are kept, never processes or memory (see the package docstring).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

from instance_svc.runtime.base import RuntimeError_, SnapshotResult
from instance_svc.runtime.local import freezer
from instance_svc.runtime.local.state_file import SandboxState


def archive_kind(path: Path) -> str:
    """tar's decompression flag for the archive at `path` (RuntimeError_ if it is no snapshot)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"\x28\xb5\x2f\xfd":
        return "--zstd"
    if magic[:2] == b"\x1f\x8b":
        return "--gzip"
    raise RuntimeError_(f"{path} is not a snapshot archive (neither zstd nor gzip)")


def restore(archive: Path, layer: Path) -> None:
    """Fill `layer` from a snapshot archive (blocking: run it in a thread).

    `layer` is the new sandbox's freshly mounted disk (disk.py), so it exists already; a snapshot
    larger than that disk fails here with tar's "No space left on device".
    """
    layer.mkdir(mode=0o755, exist_ok=True)
    kind = archive_kind(archive)
    done = subprocess.run(
        ["tar", kind, "-xf", str(archive), "-C", str(layer), "--numeric-owner"],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError_(f"cannot restore {archive}: {done.stderr.decode(errors='replace')[-500:]}")


async def take(directory: Path, state: SandboxState, already_paused: bool, dest: Path) -> SnapshotResult:
    """Archive the sandbox's layer to `dest`, frozen meanwhile so the copy is consistent.

    A sandbox that was running is thawed again afterwards, also when the archive fails.
    """
    if not already_paused:
        await asyncio.to_thread(freezer.freeze, directory, state)
    try:
        return await archive_layer(directory / "layer", dest, state.sandbox_id)
    finally:
        if not already_paused:
            await asyncio.to_thread(freezer.thaw, directory, state)


async def archive_layer(layer: Path, dest: Path, sandbox_id: str) -> SnapshotResult:
    """tar the layer into `dest` (written as `<dest>.partial`, renamed when complete)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    compress = "--zstd" if shutil.which("zstd") else "--gzip"
    tmp = dest.with_name(dest.name + ".partial")
    proc = await asyncio.create_subprocess_exec(
        "tar",
        compress,
        "-cf",
        str(tmp),
        "--numeric-owner",
        # Sockets cannot be archived, and a stale X lock would stop Xvfb in the restored sandbox.
        "--exclude=./tmp/.X11-unix",
        "--exclude=./tmp/.X99-lock",
        "--exclude=./lost+found",  # the disk's own (disk.py), not the tenant's
        "-C",
        str(layer),
        ".",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError_(f"cannot archive sandbox {sandbox_id}: {err.decode(errors='replace')[-500:]}")
    os.replace(tmp, dest)
    return SnapshotResult(path=dest, size_bytes=os.stat(dest).st_size, includes_memory=False)
