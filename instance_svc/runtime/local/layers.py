"""The writable per-instance layer: the sandbox's own /etc, /home, /root, /tmp, /var, /opt and /srv.

A fresh layer gets a few small host /etc files copied in (the big /etc trees are bound read-only
instead, see bwrap.ETC_READONLY: copying them cost hundreds of milliseconds per create), a
passwd and group with the sandbox's "user", and the hostname files. A restored layer comes from a
snapshot archive and keeps its own /etc; only hostname, hosts and resolv.conf are rewritten,
because they belong to the new sandbox. Everything is owned by the sandbox uid at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from instance_svc.runtime.base import SandboxSpec
from instance_svc.runtime.local import bwrap, network, snapshots

# Host /etc entries programs need; everything else of the host's /etc stays invisible.
ETC_COPY = (
    "nsswitch.conf",
    "ld.so.cache",
    "ld.so.conf",
    "localtime",
    "timezone",
    "bash.bashrc",
    "profile",
    "inputrc",
    "environment",
    "mime.types",
    "os-release",
    "debian_version",
    "shells",
    "protocols",
    "services",
    "gai.conf",
    "host.conf",
    "magic",
)


def prepare(layer: Path, spec: SandboxSpec, hostname: str, uid: int, gid: int) -> None:
    """Build the layer of a new sandbox at `layer` (blocking: run it in a thread)."""
    if spec.restore_from is not None:
        snapshots.restore(spec.restore_from, layer)
    for name in bwrap.LAYER_DIRS:
        (layer / name).mkdir(parents=True, exist_ok=True)
    for sub in ("home/user", "var/tmp"):
        (layer / sub).mkdir(parents=True, exist_ok=True)
    etc = layer / "etc"
    if spec.restore_from is None:
        for name in ETC_COPY:
            src = Path("/etc") / name
            if src.is_symlink():
                os.symlink(os.readlink(src), etc / name)
            elif src.is_file():
                shutil.copyfile(src, etc / name)
        (etc / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000:user:/home/user:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        )
        (etc / "group").write_text("root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n")
    (etc / "hostname").write_text(hostname + "\n")
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n127.0.1.1 {hostname}\n")
    resolv = etc / "resolv.conf"
    with contextlib.suppress(FileNotFoundError):
        resolv.unlink()
    if spec.internet:
        # slirp4netns's resolver (network.py): the host's own resolver may sit on an address the
        # sandbox must not reach (a loopback stub, a private range).
        # With host names in the egress lists, dns_guard.py (network.py) answers instead.
        resolv.write_text(f"nameserver {network.resolver_address(spec.egress_allow, spec.egress_deny)}\n")
    os.chmod(layer / "tmp", 0o1777)
    os.chmod(layer / "var" / "tmp", 0o1777)
    _chown_tree(layer, uid, gid)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.lchown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)
