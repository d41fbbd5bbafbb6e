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
from instance_svc.runtime.local import disk, freezer
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
    larger than that disk fails here, said as such (tar itself reports a full disk either as
    ENOSPC or as a short write).
    """
    layer.mkdir(mode=0o755, exist_ok=True)
    kind = archive_kind(archive)
    done = subprocess.run(
        ["tar", kind, "-xf", str(archive), "-C", str(layer), "--numeric-owner"],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        st = os.statvfs(layer)
        if st.f_bavail * st.f_frsize < 1024 * 1024:
            image = layer.parent / disk.IMAGE  # the disk's own size, not what ext4 leaves of it
            size_mib = (image.stat().st_size if image.exists() else st.f_blocks * st.f_frsize) // (1024 * 1024)
            raise RuntimeError_(
                f"cannot restore the snapshot: its files do not fit the instance's {size_mib} MiB disk "
                "(no space left on device); restore it into a larger disk_mib"
            )
        raise RuntimeError_(f"cannot restore {archive}: {done.stderr.decode(errors='replace')[-500:]}")


async def take(directory: Path, state: SandboxState, already_paused: bool, dest: Path) -> SnapshotResult:
    """Archive the sandbox's layer to `dest`, frozen meanwhile so the copy is consistent.

    A sandbox that was running is thawed again afterwards, also when the archive fails.
    """
    if (directory / disk.IMAGE).exists() and not disk.mounts_under(directory / "layer"):
        # The disk is mounted in the host's mount namespace; an instance_svc started in another
        # one (systemd's PrivateMounts, a container) would archive the empty mount point.
        raise RuntimeError_(
            f"the disk of sandbox {state.sandbox_id} is not mounted where instance_svc runs "
            "(run instance_svc in the host's mount namespace)"
        )
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
