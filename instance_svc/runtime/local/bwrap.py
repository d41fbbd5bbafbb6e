"""The command line that starts one local sandbox: a launcher shell, then bubblewrap, then the agent.

Why a launcher: the sandbox runs as an unprivileged host uid (root that bubblewrap keeps as root
keeps its capabilities and could write host sysctls through /proc/sys), and that uid cannot reach
paths under 0700 directories such as /root (the Python interpreter) or the platform state dir (the
writable layer). So a root shell in a private mount namespace (`unshare --mount`) first

1. writes its own pid into the sandbox's cgroups, so every later process is born inside them,
2. bind-mounts each source the sandbox needs onto a fresh tmpfs "stage" (visible only in that
   private namespace, gone with the sandbox: nothing is left mounted on the host),
3. drops its copies of every other loop-device mount (the other sandboxes' disks, disk.py): the
   namespace got a private copy of each at `unshare`, which would keep their file systems and loop
   devices alive until this sandbox ends, long after their own sandboxes were deleted,

then drops to the sandbox uid with `setpriv` and execs bubblewrap, which binds from the stage.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# $1 stage dir, $2 cgroup.procs files (space separated), $3 count N, then N sources, then the command.
LAUNCH_SCRIPT = r"""
set -e
stage=$1; procs=$2; n=$3; shift 3
for f in $procs; do echo $$ > "$f"; done
mount -t tmpfs -o mode=0755,size=64k cyberdesk-stage "$stage"
i=0
while [ "$i" -lt "$n" ]; do
  mkdir "$stage/$i"
  mount --bind "$1" "$stage/$i"
  i=$((i + 1)); shift
done
drop=$(awk -v stage="$stage/" '{ for (i = 7; i < NF; i++) if ($i == "-") break }
  $(i + 2) ~ /^\/dev\/loop/ && index($5, stage) != 1 { print $5 }' /proc/self/mountinfo)
[ -z "$drop" ] || umount -l $drop 2>/dev/null || true
exec "$@"
"""

# Run as PID 1 of a desktop sandbox: Xvfb first, then (if installed) a window manager, then exec the agent.
DESKTOP_SCRIPT = r"""
geometry=$1; wm=$2; shift 2
rm -f /tmp/.X99-lock /tmp/.X11-unix/X99
Xvfb :99 -screen 0 "$geometry" -nolisten tcp &
i=0
while [ ! -S /tmp/.X11-unix/X99 ]; do
  i=$((i + 1))
  if [ "$i" -gt 1500 ]; then echo "cyberdesk: Xvfb did not start" >&2; exit 1; fi
  sleep 0.01
done
if [ -n "$wm" ]; then DISPLAY=:99 "$wm" & fi
exec "$@"
"""

# Where the agent's code and Python packages appear inside the sandbox.
AGENT_DIR = "/opt/cyberdesk"
SOCK_DIR = "/run/cyberdesk"
# Where the sandbox's own cgroups (delegated to its uid, cgroups.py) appear inside: one dir per controller.
CGROUP_DIR = "/run/cgroup"
# Writable dirs of the per-instance layer, bound at the same path inside.
LAYER_DIRS = ("etc", "home", "root", "tmp", "var", "opt", "srv")
# Host /etc trees bound read-only over the layer's /etc (not /etc/ssl/private: only the certificates).
ETC_READONLY = (
    "ssl/certs",
    "ssl/openssl.cnf",
    "ca-certificates",
    "alternatives",
    "fonts",
    "X11",
    "ld.so.conf.d",
    "profile.d",
)
_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Tried in this order for desktop sandboxes; none installed means Xvfb without a window manager.
_WINDOW_MANAGERS = ("matchbox-window-manager", "openbox", "twm")


@dataclass(frozen=True)
class Launch:
    """Everything that varies between sandboxes' command lines."""

    layer: Path
    sock_dir: Path
    hostname: str
    internet: bool
    uid: int
    gid: int
    python_prefix: Path  # sys.base_prefix of the agent's interpreter
    python: Path  # the interpreter, under python_prefix
    site_packages: Path
    packages: Sequence[Path]  # top-level package dirs the agent imports
    command: Sequence[str]
    info_fd: int = -1  # bubblewrap's --info-fd; spawn.spawn_sandbox sets it to its pipe
    cgroup_procs: Sequence[str] = ()
    stage: str = "/mnt"
    data_rlimit: int | None = None  # bytes; only when no memory cgroup
    # bubblewrap's --block-fd: an INTERNET sandbox's PID 1 waits on it until its network is ready.
    block_fd: int = -1
    seccomp_fd: int = -1  # bubblewrap's --seccomp; spawn.spawn_sandbox sets it to a memfd (seccomp.py)
    nested_userns: bool = False  # the template asks for nested user namespaces (no --disable-userns)
    cgroup_binds: Sequence[tuple[str, str]] = ()  # (controller, host dir delegated to the sandbox uid)


def argv(launch: Launch) -> list[str]:
    """The full command line (no secrets in it: env and token travel by environment and pipe)."""
    sources: list[str] = []

    def staged(src: Path) -> str:
        sources.append(str(src))
        return f"{launch.stage}/{len(sources) - 1}"

    bw = ["bwrap", "--unshare-all"]
    if not launch.nested_userns:
        # The kernel refuses nested user namespaces even to a call the seccomp filter would let
        # through; bubblewrap wants the user namespace asked for explicitly to do it.
        bw += ["--unshare-user", "--disable-userns"]
    if launch.seccomp_fd >= 0:
        bw += ["--seccomp", str(launch.seccomp_fd)]
    if launch.block_fd >= 0:
        # PID 1 waits until the root side has set up the sandbox's network (network.py).
        bw += ["--block-fd", str(launch.block_fd)]
    bw += ["--uid", "1000", "--gid", "1000", "--hostname", launch.hostname, "--as-pid-1"]
    bw += ["--info-fd", str(launch.info_fd)]
    bw += ["--ro-bind", "/usr", "/usr"]
    for name in _ROOT_LINKS:
        host = Path("/") / name
        if host.is_symlink():
            bw += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            bw += ["--ro-bind", str(host), f"/{name}"]
    bw += ["--proc", "/proc", "--dev", "/dev"]
    layer = staged(launch.layer)
    for name in LAYER_DIRS:
        bw += ["--bind", f"{layer}/{name}", f"/{name}"]
    for name in ETC_READONLY:
        bw += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    bw += ["--tmpfs", "/run", "--bind", staged(launch.sock_dir), SOCK_DIR]
    for controller, host_dir in launch.cgroup_binds:
        # The agent makes one cgroup per command here (guest_agent/process_cgroups.py).
        bw += ["--bind", staged(Path(host_dir)), f"{CGROUP_DIR}/{controller}"]
    if not str(launch.python_prefix).startswith("/usr/"):
        bw += ["--ro-bind", staged(launch.python_prefix), str(launch.python_prefix)]
    bw += ["--tmpfs", AGENT_DIR]
    bw += ["--ro-bind", staged(launch.site_packages), f"{AGENT_DIR}/site-packages"]
    for package in launch.packages:
        bw += ["--ro-bind", staged(package), f"{AGENT_DIR}/agent/{package.name}"]
    bw += ["--remount-ro", AGENT_DIR, "--chdir", "/home/user", "--"]
    bw += list(launch.command)

    privdrop = ["setpriv", f"--reuid={launch.uid}", f"--regid={launch.gid}", "--clear-groups", "--"]
    limits = ["prlimit", f"--data={launch.data_rlimit}", "--"] if launch.data_rlimit else []
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        LAUNCH_SCRIPT,
        "cyberdesk-launch",
        launch.stage,
        " ".join(launch.cgroup_procs),
        str(len(sources)),
        *sources,
        *limits,
        *privdrop,
        *bw,
    ]


def agent_command(python: Path, desktop: tuple[int, int] | None, window_manager: str) -> list[str]:
    """The sandbox's PID 1: the agent, or the desktop script that starts Xvfb and then execs the agent."""
    agent = [str(python), "-m", "guest_agent"]
    if desktop is None:
        return agent
    width, height = desktop
    return ["/bin/sh", "-c", DESKTOP_SCRIPT, "cyberdesk-desktop", f"{width}x{height}x24", window_manager, *agent]


def find_window_manager() -> str:
    """The first installed window manager of `_WINDOW_MANAGERS`, or "" for none."""
    return next((w for w in _WINDOW_MANAGERS if shutil.which(w)), "")
