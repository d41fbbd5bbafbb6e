"""The local runtime: one bubblewrap sandbox per instance, on this machine.

`LocalRuntime` (runtime.py) implements the `Runtime` contract of instance_svc/runtime/base.py;
each concern it relies on has its own module:

| module | where ... |
| --- | --- |
| `runtime.py` | the contract: create, delete, pause, resume, snapshot, list; one lock per sandbox |
| `options.py` | the knobs (sandbox uid, ready timeout, pids limit, interpreter) |
| `layers.py` | the writable per-instance layer is built (/etc, /home, ... of the sandbox) |
| `spawn.py` | a sandbox is spawned (token pipe, environment) and polled until its agent is healthy |
| `bwrap.py` | its command line is written (launcher shell, bubblewrap, the agent or Xvfb) |
| `agent_code.py` | the code the sandbox binds is chosen (our packages, the interpreter's site-packages) |
| `cgroups.py` | limits are written to cgroups (delegated to the sandbox), its processes are killed through them |
| `seccomp.py` | the seccomp filter every sandbox runs under is built (libseccomp) and handed to bubblewrap |
| `state_file.py` | its state file is written and read (what re-adoption after a restart needs) |
| `procscan.py` | /proc is scanned: is a recorded pid still ours, what are a sandbox's processes |
| `freezer.py` | it is paused and resumed (cgroup freezer, SIGSTOP of the tree without one) |
| `snapshots.py` | snapshots are taken (the layer archived while frozen) and restored into a new layer |
| `teardown.py` | a sandbox is killed and its cgroups, disk and files removed |
| `disk.py` | its disk is made (a sparse ext4 image loop-mounted as the layer), found and released |
| `network.py` | an INTERNET sandbox gets its egress rules (nft) and slirp4netns, and loses them with it |
| `dns_guard.py` | the DNS forwarder of a sandbox whose egress names hosts (learns allowed names' addresses) |
| `watch.py` | its death is noticed (pidfds of its agent and bubblewrap on the event loop) and explained |

Running sandboxes are found after a restart by `LocalRuntime.list()`: every directory under the
base with a state file, alive when the recorded bubblewrap pid still has its recorded start time
(and, never alive, a directory without a started sandbox: a create cut short). Whatever else of
a sandbox exists on the host is found without any record by `LocalRuntime.sweep()`: processes by
the mark in their environment (procscan.MARK_ENV), cgroups by name under the base's own group,
mounts and loop devices by path; the start-up reconciliation destroys all of it that no instance
owns, so a crash of instance_svc at any point leaves nothing behind.

Layout of `<base>/<sandbox_id>/` (the base is the platform state dir's `instances/`; no sandbox
can see it):

* `state.json` (0600): what `list()` needs to re-adopt the sandbox after instance_svc restarts,
  including the agent token, which therefore never has to exist inside the sandbox.
* `agent.log`: stdout and stderr of the sandbox's PID 1 (the agent, Xvfb).
* `sock/`: bound at /run/cyberdesk inside; the agent listens on `sock/agent.sock`.
* `disk.img` (0600): the sandbox's disk, a sparse ext4 image of `SandboxSpec.disk_mib`.
* `layer/`: the writable per-instance layer, bound at /etc, /home, /root, /tmp, /var, /opt and
  /srv: the mount point of `disk.img` (loop device, host mount namespace), so writes beyond the
  size fail with ENOSPC and `df` shows it (disk.py). It is what a snapshot archives. /usr and the
  /bin, /lib... links are the host's, read-only: bubblewrap 0.8 has no overlay, and an overlay
  mounted by root would be useless to an unprivileged sandbox uid anyway (it cannot write over
  root-owned lower files).

Isolation: new mount, pid, ipc, uts, cgroup, user and network namespaces, always. A sandbox with
the internet gets user-mode networking in its own namespace (slirp4netns, behind nft rules the
root side loads before the agent runs: never the host, link-local or private ranges; network.py,
docs/network.md). The sandbox runs as host uid `sandbox_uid` (uid 1000
"user" inside), never as host root: bubblewrap started by root keeps every capability, and a
root-mapped process could write host sysctls through /proc/sys. Everything inside runs under a
seccomp filter (seccomp.py: moby's default denials, EPERM) and cannot create user namespaces
(`--disable-userns`) unless the spec asks for nested ones. The sandbox's pids, freezer and memory
cgroups are delegated to its uid and bound at /run/cgroup, where the agent gives every command a
cgroup of its own, so that a timeout ends all the command started (guest_agent/process_cgroups.py).
What tenant code can and cannot do, in one place: docs/isolation.md.

The agent token reaches the agent through an inherited pipe (CYBERDESK_AGENT_TOKEN_FILE names
/proc/self/fd/N): nothing inside the sandbox can read it from a file or from the agent's initial
environment afterwards.

Sandboxes outlive instance_svc: bubblewrap runs in its own session and is not told to die with
its parent, so a restarted instance_svc finds them with `list()` and watches them again
(`watch()`: pidfds work for processes that are not our children).

What a snapshot cannot keep: running processes and their memory (including the X server's
screen). Restoring gives the files of the writable layer and a freshly started agent. The
KubeVirt runtime will snapshot the whole virtual machine, memory included.
"""

from instance_svc.runtime.local.options import LocalOptions
from instance_svc.runtime.local.runtime import LocalRuntime

__all__ = ["LocalOptions", "LocalRuntime"]
