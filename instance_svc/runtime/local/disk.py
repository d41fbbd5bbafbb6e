"""The disk of a local sandbox: a sparse ext4 image, loop-mounted on the host as its writable layer.

Why a file system of its own and not quotas on the host's: ext4 project quotas need the host's file
system formatted (or mounted) for them, and `df` inside would still show the host's disk; a loop
device with its own ext4 needs nothing of the host but a loop driver, and the kernel answers every
write beyond the size with ENOSPC, `df` shows the instance's size, and the host loses at most that
size. The image is sparse and mounted with `discard`, so an idle instance costs the ~1 MiB of
metadata mkfs writes, and deleted files give their blocks back to the host.

Layout in `<base>/<sandbox_id>/`: `disk.img` (0600, root's) and `layer/`, its mount point. The
mount lives in the host's mount namespace, so it outlives instance_svc like the sandbox does and a
restarted instance_svc re-adopts the sandbox with its disk still mounted. It is found again from
/proc/self/mountinfo (every mount under the sandbox's directory) and its loop device from sysfs
(every loop device whose backing file is the image), so teardown needs nothing recorded.

mkfs choices (measured here: truncate + mkfs of 2 GiB ~16 ms, mount ~9 ms, 1.2 MiB on disk):
no journal (a sandbox's disk does not survive a host crash's fsck anyway: after a reboot the
sandbox is gone), 0 reserved blocks (root inside is the tenant), lazy inode tables that the kernel
is told never to zero (`noinit_itable`: the unwritten parts of a sparse file read as zeroes
already, and zeroing them would cost the host the whole inode table per instance).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import subprocess
import time
from pathlib import Path

from instance_svc.runtime.base import RuntimeError_
from instance_svc.runtime.local import procscan

IMAGE = "disk.img"
MIB = 1024 * 1024
_MNT_DETACH = 2
_LOOP_CLR_FD = 0x4C01
# Mount options of a sandbox's disk: no device nodes or set-uid programs from tenant files, and
# discard so that blocks freed inside are holes in the image again.
MOUNT_OPTIONS = "loop,nodev,nosuid,discard,noinit_itable"

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _run(argv: list[str], what: str, directory: Path | None = None, mark: str = "") -> None:
    # The sandbox's mark (procscan.MARK_ENV): a mkfs or mount that outlives a killed instance_svc
    # is found and killed by the start-up sweep before it releases the sandbox's disk.
    env = {**os.environ, procscan.MARK_ENV: mark} if mark else None
    try:
        done = subprocess.run(argv, capture_output=True, check=False, env=env)
    except FileNotFoundError:
        raise RuntimeError_(f"cannot {what}: {argv[0]} is not installed (run `make setup`: e2fsprogs)") from None
    if done.returncode != 0:
        text = done.stderr.decode(errors="replace").strip()
        if directory is not None:
            # The message reaches the tenant (state_message): no host path in it.
            text = text.replace(str(directory), "<sandbox>")
        raise RuntimeError_(f"cannot {what}: {text[-500:]}")


def create(directory: Path, size_mib: int, uid: int, gid: int, mark: str = "") -> Path:
    """Make `<directory>/disk.img` of `size_mib` and mount it at `<directory>/layer`; returns the layer.

    Blocking (run it in a thread). On failure nothing stays mounted; the image is left for the
    sandbox's teardown (which removes the directory).
    """
    image, layer = directory / IMAGE, directory / "layer"
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_mib * MIB)  # sparse: no block is allocated until mkfs or the tenant writes
    finally:
        os.close(fd)
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-E",
            f"lazy_itable_init=1,nodiscard,root_owner={uid}:{gid}",
            str(image),
        ],
        f"format the {size_mib} MiB disk",
        directory,
        mark,
    )
    layer.mkdir(mode=0o755)
    _run(
        ["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(image), str(layer)],
        f"mount the {size_mib} MiB disk",
        directory,
        mark,
    )
    # mkfs leaves lost+found; nothing inside sees the layer's root (only its LAYER_DIRS are bound),
    # and without it snapshots and restores need no exception for it.
    with contextlib.suppress(OSError):
        os.rmdir(layer / "lost+found")
    return layer


def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory` in this process's mount namespace, deepest first."""
    # The kernel writes canonical paths: a base reached through a symbolic link must match too.
    prefix = os.path.realpath(directory).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split(" ", 5)[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def loops_backed_by(image: Path) -> list[str]:
    """The loop devices (/dev/loopN) whose backing file is `image` (also after the image was unlinked)."""
    target = os.path.realpath(image)
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue  # not attached
        if backing == target or backing == target + " (deleted)":
            found.append(f"/dev/{entry.name}")
    return sorted(found)


def release(directory: Path, wait: float = 10.0) -> list[str]:
    """Unmount everything under `directory` and detach the loop devices of its image; idempotent.

    Blocking. Returns what could not be released (empty when all is gone). A mount that is busy
    (a host process inside it) is detached lazily: it disappears from the tree at once and the
    file system goes when its last user does. A loop device is detached on its last close (the
    kernel's autoclear), which can trail the sandbox's death while its namespaces are torn down and
    the file system writes back what the tenant left dirty (0.5 s for 300 MiB here): wait for it
    up to `wait` seconds.
    """
    for point in mounts_under(directory):
        if _libc.umount2(point.encode(), 0) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point (any more)
                _libc.umount2(point.encode(), _MNT_DETACH)
    image = directory / IMAGE
    deadline = time.monotonic() + wait
    while True:
        loops = loops_backed_by(image)
        for device in loops:
            # LOOP_CLR_FD on a device still held sets autoclear and returns 0 (Linux >= 5.x), so
            # asking again is harmless.
            with contextlib.suppress(OSError), open(device, "rb") as dev:
                fcntl.ioctl(dev.fileno(), _LOOP_CLR_FD)
        left = mounts_under(directory) + loops_backed_by(image)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.01)


def usage_bytes(image: Path) -> int:
    """Bytes of the host's disk the image really takes (its allocated blocks)."""
    try:
        return os.stat(image).st_blocks * 512
    except FileNotFoundError:
        return 0


def owners(base: Path) -> set[str]:
    """Names of the sandbox dirs under `base` that hold a mount or a loop device now (also once the dir is gone)."""
    prefix = os.path.realpath(base).rstrip("/") + "/"
    found: set[str] = set()
    for point in mounts_under(base):
        if point.startswith(prefix):
            found.add(point[len(prefix) :].split("/", 1)[0])
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip().removesuffix(" (deleted)")
        except OSError:
            continue
        if backing.startswith(prefix):
            found.add(backing[len(prefix) :].split("/", 1)[0])
    return found
