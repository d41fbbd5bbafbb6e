"""Instance disks with real sandboxes: the kernel enforces the size, and nothing stays mounted or attached.

Runtime level (a LocalRuntime on a fresh base dir, commands entered with nsenter as the sandbox's
user): fallocate and dd past the size fail with ENOSPC, `df` shows the size, the host's free
space drops by at most the size, deletes leave no mount and no loop device (also while another
sandbox runs, and for a create that failed), snapshots restore into a disk as large or larger.
Service level (instance_svc as a process): disk_mib on create and in the quota, an upload that
does not fit is RESOURCE_EXHAUSTED leaving no file, and a restart re-adopts a mounted disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cyberdesk._requests import upload_trailer
from cyberdesk_proto.v1 import filesystem_pb2, filesystem_pb2_grpc, instance_pb2
from cyberdesk_stack.launcher import sweep_sandboxes
from instance_svc.runtime.base import RuntimeError_, SandboxSpec
from instance_svc.runtime.local import LocalOptions, LocalRuntime, disk
from tests.instance_svc.conftest import Svc, meta, running
from tests.instance_svc.integration.runtime.conftest import Sandboxes

MiB = 1024 * 1024
RUNNING = instance_pb2.INSTANCE_STATE_RUNNING


def _loops_under(base: Path) -> list[str]:
    """Lines of `losetup -a` whose backing file lies under `base`."""
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if f"({base}/" in line]


def _mounts_under(base: Path) -> list[str]:
    """Mount points under `base` in /proc/self/mountinfo (field 5)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(f"{base}/")]


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Sandboxes]:
    """A local runtime on `<tmp>/state/instances`; whatever is left at the end is deleted."""
    if shutil.which("bwrap") is None or shutil.which("mkfs.ext4") is None:
        pytest.fail("bubblewrap or mkfs.ext4 is not installed; run `make setup`")
    sandboxes = Sandboxes(tmp_path / "state" / "instances")
    yield sandboxes

    async def cleanup() -> None:
        runtime = LocalRuntime(sandboxes.base)
        for info in await runtime.list():
            await runtime.delete(info.sandbox_id)

    asyncio.run(cleanup())
    for directory in sandboxes.base.iterdir() if sandboxes.base.exists() else ():
        disk.release(directory)


def test_writes_beyond_the_disk_fail_and_the_host_pays_at_most_its_size(tmp_path: Path) -> None:
    # The "host" is a scratch file system of its own, so the free space measured is this test's
    # alone (other tests write to the machine's disk meanwhile).
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    host = disk.create(scratch, 1024, 0, 0)
    box = Sandboxes(host / "instances")
    try:
        _fill_and_measure(box)
    finally:
        asyncio.run(box.runtime.delete("sb-q"))
        assert disk.release(scratch) == []


def _fill_and_measure(box: Sandboxes) -> None:
    free_before = _free_bytes(box.base)
    info = box.run(box.runtime.create(SandboxSpec(sandbox_id="sb-q", disk_mib=256)))
    assert ("disk_bytes", 256 * MiB, "filesystem") in [(lim.name, lim.value, lim.mechanism) for lim in info.limits]

    huge = box.sh("sb-q", "fallocate -l 20G /home/user/huge")
    assert huge.returncode != 0 and "No space left on device" in huge.stderr, huge
    # ext4 keeps what a failed fallocate got (the rest of the disk): give it back first.
    assert box.sh("sb-q", "rm /home/user/huge").returncode == 0
    filled = box.sh("sb-q", "dd if=/dev/zero of=/home/user/fill bs=1M count=400 conv=fsync")
    assert filled.returncode != 0 and "No space left on device" in filled.stderr, filled
    # /tmp and /var are on the same disk: it is full there too.
    for other in ("/tmp/more", "/var/tmp/more"):
        assert "No space left" in box.sh("sb-q", f"head -c 2M /dev/zero > {other}").stderr

    size = int(box.sh("sb-q", "stat -c %s /home/user/fill").stdout)
    assert 200 * MiB < size <= 256 * MiB
    df = box.sh("sb-q", "df -k --output=size,avail /home /tmp").stdout.split()
    total_kib, avail_kib = int(df[2]), int(df[3])
    assert 230 * 1024 <= total_kib <= 256 * 1024 and avail_kib < 1024, df
    assert df[4:6] == df[2:4], "/tmp is not on the instance's disk"

    image = box.base / "sb-q" / disk.IMAGE
    assert disk.usage_bytes(image) <= 256 * MiB
    # At most the disk's size, plus the sandbox's own small files beside it (state, log, socket).
    assert free_before - _free_bytes(box.base) <= 256 * MiB + 1 * MiB

    # Deleting inside gives the blocks back to the host (the disk is mounted with discard).
    assert box.sh("sb-q", "rm /home/user/fill && sync").returncode == 0
    assert disk.usage_bytes(image) < 32 * MiB
    assert free_before - _free_bytes(box.base) < 32 * MiB


def test_delete_leaves_no_mount_and_no_loop_device_while_another_sandbox_runs(box: Sandboxes) -> None:
    box.run(box.runtime.create(SandboxSpec(sandbox_id="sb-a", disk_mib=256)))
    box.run(box.runtime.create(SandboxSpec(sandbox_id="sb-b", disk_mib=256)))
    assert len(_mounts_under(box.base)) == 2 and len(_loops_under(box.base)) == 2
    # sb-b's launcher was started after sb-a's disk was mounted: it must not keep a copy of it.
    box.run(box.runtime.delete("sb-a"))
    assert _mounts_under(box.base) == [f"{box.base}/sb-b/layer"]
    assert [line for line in _loops_under(box.base) if "/sb-a/" in line] == []
    still = box.sh("sb-b", "echo still > /home/user/f && cat /home/user/f")
    assert still.stdout == "still\n", still
    box.run(box.runtime.delete("sb-b"))
    assert _mounts_under(box.base) == [] and _loops_under(box.base) == []
    assert list(box.base.iterdir()) == []


def test_a_failed_create_leaves_no_mount_and_no_loop_device(tmp_path: Path) -> None:
    base = tmp_path / "instances"
    runtime = LocalRuntime(base, LocalOptions(python=Path("/usr/bin/false"), ready_timeout=10))
    # Which step notices first depends on timing: the agent's exit, bubblewrap's missing info, or
    # the pidfd watch seeing the sandbox gone right after the spawn.
    with pytest.raises(RuntimeError_, match=r"exited with|did not start|exited at once"):
        asyncio.run(runtime.create(SandboxSpec(sandbox_id="sb-f", disk_mib=256)))
    assert _mounts_under(base) == [] and _loops_under(base) == []
    assert not (base / "sb-f").exists()


def test_the_stacks_stop_sweep_releases_dead_sandboxes_and_cut_short_creates(box: Sandboxes) -> None:
    info = box.run(box.runtime.create(SandboxSpec(sandbox_id="sb-dead", disk_mib=256)))
    assert info.running
    # Its processes die on their own (here: killed behind the runtime's back); the disk stays mounted.
    for pid in box.runtime.pids("sb-dead"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while box.run(LocalRuntime(box.base).list())[0].running and time.monotonic() < deadline:
        time.sleep(0.05)
    # A create cut short after its disk was mounted: no state file at all.
    (box.base / "sb-cut").mkdir()
    disk.create(box.base / "sb-cut", 256, 100_000, 100_000)
    assert len(_mounts_under(box.base)) == 2
    listed = {i.sandbox_id: i.running for i in box.run(LocalRuntime(box.base).list())}
    assert listed == {"sb-dead": False, "sb-cut": False}

    assert sweep_sandboxes(box.base.parent) == 0  # none was running
    assert _mounts_under(box.base) == [] and _loops_under(box.base) == []
    assert list(box.base.iterdir()) == []


def test_snapshots_restore_into_a_disk_as_large_or_larger_and_not_into_a_smaller_one(
    box: Sandboxes, tmp_path: Path
) -> None:
    box.run(box.runtime.create(SandboxSpec(sandbox_id="sb-src", disk_mib=512)))
    assert box.sh("sb-src", "head -c 300M /dev/zero > /home/user/big && echo kept > /home/user/note").returncode == 0
    snap = box.run(box.runtime.snapshot("sb-src", tmp_path / "snaps" / "s.tar"))
    box.run(box.runtime.delete("sb-src"))

    for sandbox_id, size in (("sb-same", 512), ("sb-larger", 1024)):
        info = box.run(box.runtime.create(SandboxSpec(sandbox_id=sandbox_id, disk_mib=size, restore_from=snap.path)))
        assert {lim.name: lim.value for lim in info.limits}["disk_bytes"] == size * MiB
        assert box.sh(sandbox_id, "cat /home/user/note; stat -c %s /home/user/big").stdout == f"kept\n{300 * MiB}\n"
        assert "lost+found" not in box.sh(sandbox_id, "ls -A /home /tmp /var").stdout

    with pytest.raises(RuntimeError_, match="its files do not fit the instance's 256 MiB disk"):
        box.run(box.runtime.create(SandboxSpec(sandbox_id="sb-small", disk_mib=256, restore_from=snap.path)))
    assert not (box.base / "sb-small").exists()
    assert [p for p in _mounts_under(box.base) if "sb-small" in p] == []
    assert [line for line in _loops_under(box.base) if "/sb-small/" in line] == []


# --- through instance_svc ----------------------------------------------------------------------


def _create(svc: Svc, tenant: str = "t1", **kw: object) -> instance_pb2.Instance:
    request = instance_pb2.CreateInstanceRequest(**kw)  # type: ignore[arg-type]
    return svc.instances.CreateInstance(request, metadata=meta(tenant), timeout=60).instance


def _upload(svc: Svc, instance_id: str, path: str, size: int, upload_id: str = "") -> filesystem_pb2.UploadFileResponse:
    resolved = svc.resolve(instance_id)
    header = filesystem_pb2.UploadFileHeader(path=path, overwrite=True, upload_id=upload_id)

    def messages() -> Iterator[filesystem_pb2.UploadFileRequest]:
        yield filesystem_pb2.UploadFileRequest(instance_id=instance_id, header=header)
        chunk = b"\xa5" * MiB
        digest = hashlib.sha256()
        for _ in range(size // MiB):
            digest.update(chunk)
            yield filesystem_pb2.UploadFileRequest(chunk=chunk)
        yield upload_trailer(size // MiB * MiB, digest.hexdigest())

    with grpc.insecure_channel(resolved.agent_target) as channel:
        reply: filesystem_pb2.UploadFileResponse = filesystem_pb2_grpc.FilesystemServiceStub(channel).UploadFile(
            messages(), metadata=(("authorization", f"Bearer {resolved.agent_token}"),), timeout=60
        )
    return reply


def test_disk_size_validation_and_the_tenants_disk_quota(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url, quota_disk_mib="3000") as svc:
        default = _create(svc)
        assert default.state == RUNNING and default.disk_mib == 2048
        limits = {lim.name: (lim.value, lim.mechanism) for lim in default.enforced_limits}
        assert limits["disk_bytes"] == (2048 * MiB, "filesystem")
        assert svc.exec(default.instance_id, "df -m --output=size /home | tail -1")[1].strip().isdigit()

        with pytest.raises(grpc.RpcError) as err:
            _create(svc, disk_mib=100)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "disk_mib must be between 256 and 65536, got 100"

        with pytest.raises(grpc.RpcError) as err:
            _create(svc, disk_mib=1024)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details() == "tenant t1 uses 2048 of 3000 MiB of disk; 1024 MiB more do not fit"
        small = _create(svc, disk_mib=512)
        assert small.state == RUNNING and small.disk_mib == 512
        # Another tenant has a quota of its own.
        assert _create(svc, tenant="t2", disk_mib=2048).state == RUNNING


def test_an_upload_that_does_not_fit_leaves_no_file_and_a_restart_re_adopts_the_mounted_disk(
    tmp_path: Path, redis_url: str
) -> None:
    with running(tmp_path, redis_url) as svc:
        inst = _create(svc, disk_mib=256)
        iid = inst.instance_id
        assert svc.exec(iid, "echo old > /home/user/target.bin")[0] == 0
        for upload_id in ("", "resumable-upload-1"):
            with pytest.raises(grpc.RpcError) as err:
                _upload(svc, iid, "/home/user/target.bin", 300 * MiB, upload_id)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert "the instance's disk (256 MiB) is full" in (err.value.details() or "")
            # The old content is kept and no temporary file holds the space.
            assert svc.exec(iid, "ls -A /home/user; cat /home/user/target.bin") == (0, b"target.bin\nold\n")
        assert _upload(svc, iid, "/home/user/target.bin", 100 * MiB).size == 100 * MiB

        base = svc.state / "instances"
        sandbox_dir = next(base.iterdir())
        svc.kill9()
        svc.start()
        got = svc.instances.GetInstance(instance_pb2.GetInstanceRequest(instance_id=iid), metadata=meta()).instance
        assert got.state == RUNNING and got.disk_mib == 256
        assert _mounts_under(base) == [f"{sandbox_dir}/layer"]
        after = svc.exec(iid, "stat -c %s /home/user/target.bin; fallocate -l 1G /home/user/more || echo full")
        assert after == (0, f"{100 * MiB}\nfull\n".encode())

        svc.instances.DeleteInstance(instance_pb2.DeleteInstanceRequest(instance_id=iid), metadata=meta(), timeout=60)
        assert _mounts_under(base) == [] and _loops_under(base) == []


def test_a_restore_takes_its_snapshots_disk_size_and_refuses_a_smaller_one(tmp_path: Path, redis_url: str) -> None:
    with running(tmp_path, redis_url) as svc:
        src = _create(svc, disk_mib=512)
        assert svc.exec(src.instance_id, "echo kept > /home/user/note")[0] == 0
        snap = svc.instances.CreateSnapshot(
            instance_pb2.CreateSnapshotRequest(instance_id=src.instance_id), metadata=meta(), timeout=60
        ).snapshot
        with pytest.raises(grpc.RpcError) as err:
            _create(svc, snapshot_id=snap.snapshot_id, disk_mib=256)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == (
            f"disk_mib 256 is smaller than the 512 MiB disk snapshot {snap.snapshot_id} was taken of; "
            "restore it into at least 512 MiB"
        )
        same = _create(svc, snapshot_id=snap.snapshot_id)
        larger = _create(svc, snapshot_id=snap.snapshot_id, disk_mib=1024)
        assert (same.state, same.disk_mib, larger.state, larger.disk_mib) == (RUNNING, 512, RUNNING, 1024)
        for inst in (same, larger):
            assert svc.exec(inst.instance_id, "cat /home/user/note") == (0, b"kept\n")


def test_a_base_reached_through_a_symbolic_link_is_released_too(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    base = tmp_path / "link" / "instances"
    runtime = LocalRuntime(base)
    asyncio.run(runtime.create(SandboxSpec(sandbox_id="sb-l", disk_mib=256)))
    real = tmp_path / "real" / "instances"
    assert _mounts_under(real) == [f"{real}/sb-l/layer"]
    asyncio.run(runtime.delete("sb-l"))
    assert _mounts_under(real) == [] and _loops_under(real) == []


def test_a_snapshot_refuses_a_disk_instance_svc_cannot_see(box: Sandboxes, tmp_path: Path) -> None:
    box.run(box.runtime.create(SandboxSpec(sandbox_id="sb-ns", disk_mib=256)))
    assert box.sh("sb-ns", "echo data > /home/user/f").returncode == 0
    # As if instance_svc ran in a mount namespace of its own: the sandbox keeps its disk, we do not see it.
    subprocess.run(["umount", "-l", str(box.base / "sb-ns" / "layer")], check=True)
    with pytest.raises(RuntimeError_, match="not mounted where instance_svc runs"):
        box.run(box.runtime.snapshot("sb-ns", tmp_path / "s.tar"))
    assert box.sh("sb-ns", "cat /home/user/f").stdout == "data\n"
    box.run(box.runtime.delete("sb-ns"))
    assert _loops_under(box.base) == []
