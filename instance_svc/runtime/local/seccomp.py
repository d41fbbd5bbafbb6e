"""The seccomp filter every local sandbox runs under, built with libseccomp and handed to bubblewrap.

What it denies starts from what container runtimes deny by default (moby's default profile, the
one Docker applies to every container without extra capabilities): the syscalls that reach
kernel subsystems a tenant never needs and that have carried most container-escape bugs. Each
denied call fails with EPERM, as under Docker, so programs that probe for a feature (keyctl for a
keyring, bpf for a loader, mount for a FUSE helper) see "not permitted" and fall back instead of
being killed.

* Namespaces: `unshare` and `clone` with any CLONE_NEW* flag, and `setns`. `clone3` answers
  ENOSYS, as under Docker: its flags live in a struct seccomp cannot read, and ENOSYS makes glibc
  (thread creation, posix_spawn) fall back to `clone`, whose flags it can check.
* Mounts: mount, umount2, pivot_root, chroot and the new mount API (open_tree, move_mount,
  fsopen, fsconfig, fsmount, fspick, mount_setattr).
* Keyrings (keyctl, add_key, request_key), bpf, perf_event_open, userfaultfd, io_uring, fanotify.
* Modules and kexec, reboot, swapon/swapoff, acct, quotactl, the clock setters, syslog, iopl and
  ioperm, lookup_dcookie, nfsservctl, vhangup, uselib.
* Other processes' memory and file handles: process_vm_readv/writev, kcmp, name_to_handle_at,
  open_by_handle_at. NUMA placement (mbind, set_mempolicy, migrate_pages, move_pages).

A template that asks for nested user namespaces (`nested_userns`) gets the same filter without
the namespace and mount rules: a user namespace's own root needs them to build a container.

The filter is compiled once per instance_svc process and per variant (libseccomp's BPF is a few
kilobytes and takes milliseconds to build); each sandbox gets its bytes in a fresh memfd, which
bubblewrap reads through `--seccomp FD` and loads right before it execs the sandbox's PID 1, so
the agent and everything it starts run under it.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile

import pyseccomp  # type: ignore[import-untyped]

# Always denied (EPERM), whatever the template.
DENIED: tuple[str, ...] = (
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "fanotify_init",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "syslog",
    "iopl",
    "ioperm",
    "lookup_dcookie",
    "nfsservctl",
    "vhangup",
    "uselib",
    "_sysctl",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "name_to_handle_at",
    "open_by_handle_at",
    "mbind",
    "set_mempolicy",
    "migrate_pages",
    "move_pages",
)

# Denied unless the template asks for nested user namespaces.
NAMESPACE_DENIED: tuple[str, ...] = (
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
)

# Every namespace flag of clone(2)/unshare(2) (CLONE_NEWTIME shares its bit with CSIGNAL's range
# in clone, so it is checked for unshare only).
_CLONE_NEWNS = 0x00020000
_CLONE_NEWCGROUP = 0x02000000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWTIME = 0x00000080
_CLONE_FLAGS = (
    _CLONE_NEWNS,
    _CLONE_NEWCGROUP,
    _CLONE_NEWUTS,
    _CLONE_NEWIPC,
    _CLONE_NEWUSER,
    _CLONE_NEWPID,
    _CLONE_NEWNET,
)
_UNSHARE_FLAGS = (*_CLONE_FLAGS, _CLONE_NEWTIME)


def _syscall_known(name: str) -> bool:
    # Some names exist only on other architectures (or old kernels' headers); skip those.
    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)) >= 0


@functools.cache
def filter_bpf(nested_userns: bool = False) -> bytes:
    """The compiled BPF program (cached per variant for the life of the process)."""
    flt = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    eperm = pyseccomp.ERRNO(errno.EPERM)
    names = DENIED if nested_userns else DENIED + NAMESPACE_DENIED
    for name in names:
        if _syscall_known(name):
            flt.add_rule(eperm, name)
    if not nested_userns:
        # One rule per flag: libseccomp ORs the rules of a syscall, and a masked compare of one
        # bit is exact where a compare of the whole mask would miss a call that sets only some.
        for flag in _CLONE_FLAGS:
            flt.add_rule(eperm, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
        for flag in _UNSHARE_FLAGS:
            flt.add_rule(eperm, "unshare", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
        flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        flt.export_bpf(out)
        out.seek(0)
        return out.read()


def filter_fd(nested_userns: bool = False) -> int:
    """A new memfd holding the filter, positioned at 0, inheritable; the caller closes it after the spawn."""
    data = filter_bpf(nested_userns)
    fd = os.memfd_create("cyberdesk-seccomp", 0)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
