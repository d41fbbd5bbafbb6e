"""The seccomp filter (seccomp.py) and the switches that hand it, the userns ban and the delegated
cgroups to bubblewrap (bwrap.py), built without starting a sandbox. What the filter does to a
real process is tested in tests/instance_svc/integration/test_confinement.py."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from instance_svc.runtime.local import bwrap, seccomp
from tests.instance_svc.unit.runtime_local.test_bwrap_argv import _launch

_SOCK_FILTER_BYTES = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k


def test_the_filter_is_compiled_once_per_variant() -> None:
    strict = seccomp.filter_bpf()
    assert strict is seccomp.filter_bpf()  # cached: one compile per process
    assert len(strict) % _SOCK_FILTER_BYTES == 0 and len(strict) > 50 * _SOCK_FILTER_BYTES
    nested = seccomp.filter_bpf(nested_userns=True)
    # Without the namespace and mount rules (and clone/unshare's flag checks) it is shorter.
    assert nested != strict and len(nested) < len(strict)


def test_the_denied_lists_cover_the_container_defaults() -> None:
    for name in ("keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "kexec_load"):
        assert name in seccomp.DENIED
    for name in ("mount", "umount2", "pivot_root", "setns"):
        assert name in seccomp.NAMESPACE_DENIED and name not in seccomp.DENIED


def test_filter_fd_is_a_fresh_readable_copy_at_offset_zero() -> None:
    fd = seccomp.filter_fd()
    try:
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        assert os.read(fd, 1 << 20) == seccomp.filter_bpf()
    finally:
        os.close(fd)


def test_bwrap_gets_the_filter_the_userns_ban_and_the_cgroup_binds() -> None:
    argv = bwrap.argv(
        _launch(seccomp_fd=9, cgroup_binds=(("pids", "/sys/fs/cgroup/pids/sb-a"), ("memory", "/cg/memory/sb-a")))
    )
    bw = argv[argv.index("bwrap") :]
    assert bw[bw.index("--seccomp") + 1] == "9"
    assert "--disable-userns" in bw and "--unshare-user" in bw
    stage_sources = argv[12 : 12 + int(argv[11])]
    binds = {
        dst: stage_sources[int(Path(src).name)]
        for src, dst in itertools.pairwise(bw)
        if src[:5] == "/mnt/" and src[5:].isdigit()
    }
    assert binds["/run/cgroup/pids"] == "/sys/fs/cgroup/pids/sb-a"
    assert binds["/run/cgroup/memory"] == "/cg/memory/sb-a"


def test_a_template_with_nested_user_namespaces_keeps_them() -> None:
    bw = bwrap.argv(_launch(nested_userns=True))
    assert "--disable-userns" not in bw
    assert "--seccomp" not in bw  # no fd given: spawn_sandbox always gives one
