"""The local runtime: one bubblewrap sandbox per instance, on this machine.

Layout of `<base>/<sandbox_id>/` (the base is the platform state dir's `instances/`; no sandbox
can see it):

* `state.json` (0600): what `list()` needs to re-adopt the sandbox after instance_svc restarts,
  including the agent token, which therefore never has to exist inside the sandbox.
* `agent.log`: stdout and stderr of the sandbox's PID 1 (the agent, Xvfb).
* `sock/`: bound at /run/cyberdesk inside; the agent listens on `sock/agent.sock`.
* `layer/`: the writable per-instance layer, bound at /etc, /home, /root, /tmp, /var, /opt and
  /srv. It is what a snapshot archives. /usr and the /bin, /lib... links are the host's,
  read-only: bubblewrap 0.8 has no overlay, and an overlay mounted by root would be useless to
  an unprivileged sandbox uid anyway (it cannot write over root-owned lower files).

Isolation: new mount, pid, ipc, uts, cgroup, user and network namespaces (network shared only
when the spec asks for the internet). The sandbox runs as host uid `sandbox_uid` (uid 1000
"user" inside), never as host root: bubblewrap started by root keeps every capability, and a
root-mapped process could write host sysctls through /proc/sys.

The agent token reaches the agent through an inherited pipe (CYBERDESK_AGENT_TOKEN_FILE names
/proc/self/fd/N): nothing inside the sandbox can read it from a file or from the agent's initial
environment afterwards.

Sandboxes outlive instance_svc: bubblewrap runs in its own session and is not told to die with
its parent, so a restarted instance_svc finds them with `list()`.

What a snapshot cannot keep: running processes and their memory (including the X server's
screen). Restoring gives the files of the writable layer and a freshly started agent. The
KubeVirt runtime will snapshot the whole virtual machine, memory included.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instance_svc.runtime import _bwrap
from instance_svc.runtime._cgroups import CgroupManager, SandboxCgroups
from instance_svc.runtime.base import (
    AgentEndpoint,
    Limit,
    RuntimeError_,
    SandboxInfo,
    SandboxSpec,
    SnapshotResult,
)

_log = logging.getLogger("instance_svc.runtime.local")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MIB = 1024 * 1024
# Host /etc entries programs need; everything else of the host's /etc stays invisible. Small
# files are copied into the writable layer; the big trees are bound read-only (copying them cost
# hundreds of milliseconds per create), see _bwrap.ETC_READONLY.
_ETC_COPY = (
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
_WINDOW_MANAGERS = ("matchbox-window-manager", "openbox", "twm")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _package_dirs() -> list[Path]:
    """The top-level packages the agent imports, and nothing else of ours.

    guest_agent, cyberdesk_common, the generated cyberdesk_proto, and the SDK package for its one
    dependency-free helper (`keep_large_blocks`). Not the launcher (cyberdesk_stack), not the other
    services, not the checkout.
    """
    import cyberdesk
    import cyberdesk_common
    import cyberdesk_proto
    import guest_agent

    return [
        Path(guest_agent.__file__).parent,
        Path(cyberdesk_common.__file__).parent,
        Path(next(iter(cyberdesk_proto.__path__))),
        Path(cyberdesk.__file__).parent,
    ]


def _site_packages() -> Path:
    for entry in sys.path:
        if entry.endswith("site-packages") and Path(entry, "grpc").is_dir():
            return Path(entry)
    raise RuntimeError_("cannot find the site-packages dir holding grpcio for the guest agent")


@dataclass(frozen=True)
class LocalOptions:
    """Knobs of the local runtime; the defaults fit a developer machine."""

    sandbox_uid: int = 100_000  # host uid of every sandbox's processes (uid 1000 inside)
    sandbox_gid: int = 100_000
    ready_timeout: float = 15.0
    pids_max: int = 1024
    use_cgroups: bool = True
    python: Path = field(
        default_factory=lambda: Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    )
    python_prefix: Path = field(default_factory=lambda: Path(sys.base_prefix))
    site_packages: Path | None = None
    packages: tuple[Path, ...] = ()
    stage_dir: str = "/mnt"


@dataclass
class _State:
    """What state.json holds."""

    sandbox_id: str
    pid: int  # the outer bubblewrap, our child while we live
    pid_start: int  # its start time in clock ticks: guards against pid reuse
    init_pid: int  # the sandbox's PID 1 (the agent) as the host sees it
    token: str
    spec: dict[str, Any]
    cgroup_version: int = 0
    cgroups: dict[str, str] = field(default_factory=dict)
    limits: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False  # paused with SIGSTOP (no freezer)
    created_at: float = 0.0


def _start_time(pid: int) -> int | None:
    """Start time of `pid` (field 22 of /proc/pid/stat), or None if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _children_of(root: int) -> list[int]:
    """Every descendant of `root` (scans /proc: /proc/<pid>/task/<tid>/children may be missing)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.lchown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def _archive_kind(path: Path) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"\x28\xb5\x2f\xfd":
        return "--zstd"
    if magic[:2] == b"\x1f\x8b":
        return "--gzip"
    raise RuntimeError_(f"{path} is not a snapshot archive (neither zstd nor gzip)")


class LocalRuntime:
    """Runs each instance in a bubblewrap sandbox under `base` (see the module docstring)."""

    name = "local"

    def __init__(self, base: Path, options: LocalOptions | None = None) -> None:
        self._base = Path(base)
        self._base.mkdir(parents=True, exist_ok=True)
        os.chmod(self._base, 0o700)
        self._opts = options or LocalOptions()
        self._cgroups = CgroupManager() if self._opts.use_cgroups else None
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._site = self._opts.site_packages or _site_packages()
        self._packages = self._opts.packages or tuple(_package_dirs())
        self._wm = next((w for w in _WINDOW_MANAGERS if shutil.which(w)), "")
        self._locks: dict[str, asyncio.Lock] = {}
        # SIGSTOP of the process tree always works, so pause is supported either way; the
        # freezer is preferred because it stops a tree atomically (no fork escapes it).
        self.supports_pause = True

    # --- paths -----------------------------------------------------------------------------

    def _dir(self, sandbox_id: str) -> Path:
        if not _ID_RE.match(sandbox_id):
            raise RuntimeError_(
                f"sandbox id {sandbox_id!r} is not valid: use 1-63 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        return self._base / sandbox_id

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _load(self, sandbox_id: str) -> _State | None:
        try:
            raw = json.loads((self._dir(sandbox_id) / "state.json").read_text())
        except (OSError, ValueError):
            return None
        names = {f.name for f in dataclasses.fields(_State)}
        return _State(**{k: v for k, v in raw.items() if k in names})

    def _save(self, directory: Path, state: _State) -> None:
        tmp = directory / "state.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(state), f)
        os.replace(tmp, directory / "state.json")

    def _endpoint(self, sandbox_id: str, token: str) -> AgentEndpoint:
        return AgentEndpoint(target=f"unix://{self._base / sandbox_id / 'sock' / 'agent.sock'}", token=token)

    def _alive(self, state: _State) -> bool:
        child = self._children.get(state.sandbox_id)
        if child is not None and child.poll() is not None:
            self._children.pop(state.sandbox_id, None)
        return _start_time(state.pid) == state.pid_start

    def _cg(self, state: _State) -> SandboxCgroups:
        return SandboxCgroups(version=state.cgroup_version, paths=dict(state.cgroups))

    def _info(self, state: _State) -> SandboxInfo:
        running = self._alive(state)
        paused = state.stopped or (running and self._cg(state).frozen())
        limits = tuple(Limit(**lim) for lim in state.limits)
        return SandboxInfo(state.sandbox_id, self._endpoint(state.sandbox_id, state.token), running, paused, limits)

    # --- create ----------------------------------------------------------------------------

    def _prepare_layer(self, layer: Path, spec: SandboxSpec, hostname: str) -> None:
        if spec.restore_from is not None:
            layer.mkdir(mode=0o755)
            kind = _archive_kind(spec.restore_from)
            done = subprocess.run(
                ["tar", kind, "-xf", str(spec.restore_from), "-C", str(layer), "--numeric-owner"],
                capture_output=True,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError_(
                    f"cannot restore {spec.restore_from}: {done.stderr.decode(errors='replace')[-500:]}"
                )
        for name in _bwrap.LAYER_DIRS:
            (layer / name).mkdir(parents=True, exist_ok=True)
        for sub in ("home/user", "var/tmp"):
            (layer / sub).mkdir(parents=True, exist_ok=True)
        etc = layer / "etc"
        if spec.restore_from is None:
            for name in _ETC_COPY:
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
        if spec.internet and Path("/etc/resolv.conf").exists():
            resolv.write_text(Path("/etc/resolv.conf").read_text())
        os.chmod(layer / "tmp", 0o1777)
        os.chmod(layer / "var" / "tmp", 0o1777)
        _chown_tree(layer, self._opts.sandbox_uid, self._opts.sandbox_gid)

    def _validate(self, spec: SandboxSpec) -> None:
        if spec.vcpus < 1 or spec.memory_mib < 16:
            raise RuntimeError_(f"a sandbox needs at least 1 vCPU and 16 MiB (got {spec.vcpus} and {spec.memory_mib})")
        for key, value in spec.env.items():
            if not _ENV_KEY_RE.match(key) or "\0" in value:
                raise RuntimeError_(f"environment variable {key!r} has an invalid name or a NUL byte")
        if spec.desktop is not None:
            width, height = spec.desktop
            if not (16 <= width <= 8192 and 16 <= height <= 8192):
                raise RuntimeError_(f"desktop size {width}x{height} is out of range (16..8192)")
        if spec.restore_from is not None and not Path(spec.restore_from).is_file():
            raise RuntimeError_(f"snapshot archive {spec.restore_from} does not exist")

    def _env(self, spec: SandboxSpec, token_fd: int) -> dict[str, str]:
        env = {
            "PATH": _PATH,
            "HOME": "/home/user",
            "USER": "user",
            "LANG": "C.UTF-8",
            **spec.env,
            "PYTHONPATH": f"{_bwrap.AGENT_DIR}/agent:{_bwrap.AGENT_DIR}/site-packages",
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "CYBERDESK_AGENT_LISTEN": f"unix://{_bwrap.SOCK_DIR}/agent.sock",
            "CYBERDESK_AGENT_TOKEN_FILE": f"/proc/self/fd/{token_fd}",
            "CYBERDESK_AGENT_INSTANCE_ID": spec.instance_id,
        }
        if spec.desktop is not None:
            env["DISPLAY"] = ":99"
        return env

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        """Start a sandbox and return once its agent answers health checks."""
        directory = self._dir(spec.sandbox_id)
        self._validate(spec)
        async with self._lock(spec.sandbox_id):
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:
                raise RuntimeError_(f"sandbox {spec.sandbox_id} already exists") from None
            try:
                return await self._start(spec, directory)
            except BaseException:
                await self._destroy(spec.sandbox_id)
                raise

    async def _start(self, spec: SandboxSpec, directory: Path) -> SandboxInfo:
        hostname = spec.instance_id or spec.sandbox_id
        layer, sock = directory / "layer", directory / "sock"
        await asyncio.to_thread(self._prepare_layer, layer, spec, hostname)
        sock.mkdir(mode=0o700)
        os.chown(sock, self._opts.sandbox_uid, self._opts.sandbox_gid)

        memory = spec.memory_mib * _MIB
        cg = (
            self._cgroups.create(spec.sandbox_id, memory, spec.vcpus, self._opts.pids_max)
            if self._cgroups
            else SandboxCgroups(version=0)
        )
        limits = [
            Limit("memory_bytes", memory, "cgroup" if cg.enforced.get("memory_bytes") else "rlimit"),
            Limit("vcpus", spec.vcpus, "cgroup" if cg.enforced.get("vcpus") else "none"),
            Limit("pids", self._opts.pids_max, "cgroup" if cg.enforced.get("pids") else "none"),
        ]
        token = secrets.token_urlsafe(32)
        state = _State(
            sandbox_id=spec.sandbox_id,
            pid=0,
            pid_start=0,
            init_pid=0,
            token=token,
            spec=self._spec_json(spec),
            cgroup_version=cg.version,
            cgroups=cg.paths,
            limits=[dataclasses.asdict(lim) for lim in limits],
            created_at=time.time(),
        )
        # Saved before the start so that a failed start still finds its cgroups to remove.
        self._save(directory, state)

        token_r, token_w = os.pipe()
        info_r, info_w = os.pipe()
        try:
            # The agent opens /proc/self/fd/N, which checks the pipe's owner: give it to the sandbox uid.
            os.fchown(token_r, self._opts.sandbox_uid, self._opts.sandbox_gid)
            os.write(token_w, token.encode())
            os.close(token_w)
            token_w = -1
            launch = _bwrap.Launch(
                layer=layer,
                sock_dir=sock,
                hostname=hostname,
                internet=spec.internet,
                uid=self._opts.sandbox_uid,
                gid=self._opts.sandbox_gid,
                python_prefix=self._opts.python_prefix,
                python=self._opts.python,
                site_packages=self._site,
                packages=self._packages,
                info_fd=info_w,
                command=_bwrap.agent_command(self._opts.python, spec.desktop, self._wm),
                cgroup_procs=cg.procs_files,
                stage=self._opts.stage_dir,
                data_rlimit=None if cg.enforced.get("memory_bytes") else memory,
            )
            proc = self._spawn(directory, launch, self._env(spec, token_r), (token_r, info_w))
        finally:
            for fd in (token_r, info_w, token_w):
                if fd >= 0:
                    os.close(fd)
        self._children[spec.sandbox_id] = proc
        state.pid = proc.pid
        try:
            info = await asyncio.to_thread(self._read_info, spec.sandbox_id, info_r, proc)
        finally:
            os.close(info_r)
        state.init_pid = int(info["child-pid"])
        start = _start_time(proc.pid)
        if start is None:
            raise RuntimeError_(f"the sandbox exited at once: {self._log_tail(spec.sandbox_id)}")
        state.pid_start = start
        self._save(directory, state)
        await self._wait_ready(spec.sandbox_id, token, proc)
        return self._info(state)

    @staticmethod
    def _spawn(
        directory: Path, launch: _bwrap.Launch, env: dict[str, str], fds: tuple[int, ...]
    ) -> subprocess.Popen[bytes]:
        # Popen forks and execs at once (no waiting), so it is called on the event loop.
        with open(directory / "agent.log", "ab") as log:
            return subprocess.Popen(
                _bwrap.argv(launch),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=fds,
                start_new_session=True,  # not in our process group: a ^C or kill of us spares it
                cwd="/",
            )

    @staticmethod
    def _spec_json(spec: SandboxSpec) -> dict[str, Any]:
        raw = dataclasses.asdict(spec)
        raw["restore_from"] = str(spec.restore_from) if spec.restore_from else None
        raw["env"] = sorted(spec.env)  # names only: values may be secrets and are not needed again
        return raw

    def _read_info(self, sandbox_id: str, fd: int, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        """bubblewrap's --info-fd JSON (the sandbox's PID 1 as the host sees it)."""
        buf = b""
        deadline = time.monotonic() + self._opts.ready_timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                chunk = os.read(fd, 4096)
                buf += chunk
                with contextlib.suppress(ValueError):
                    parsed: dict[str, Any] = json.loads(buf)
                    return parsed
                if not chunk:
                    break
            elif proc.poll() is not None:
                break
        raise RuntimeError_(f"bubblewrap did not start sandbox {sandbox_id}: {self._log_tail(sandbox_id)}")

    def _log_tail(self, sandbox_id: str, limit: int = 1500) -> str:
        try:
            text = (self._base / sandbox_id / "agent.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-limit:].strip() or "(empty log)"

    async def _wait_ready(self, sandbox_id: str, token: str, proc: subprocess.Popen[bytes]) -> None:
        sock = self._base / sandbox_id / "sock" / "agent.sock"
        deadline = time.monotonic() + self._opts.ready_timeout
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError_(
                    f"the agent of sandbox {sandbox_id} exited with {proc.returncode}: {self._log_tail(sandbox_id)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError_(
                    f"the agent of sandbox {sandbox_id} did not listen within {self._opts.ready_timeout:.0f} s: "
                    f"{self._log_tail(sandbox_id)}"
                )
            await asyncio.sleep(0.003)
        async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError_(
                        f"the agent of sandbox {sandbox_id} did not become healthy: {self._log_tail(sandbox_id)}"
                    )
                await asyncio.sleep(0.005)

    # --- delete ----------------------------------------------------------------------------

    async def delete(self, sandbox_id: str) -> None:
        """Kill every process of the sandbox, remove its cgroups and its directory. Idempotent."""
        self._dir(sandbox_id)
        async with self._lock(sandbox_id):
            await self._destroy(sandbox_id)
        self._locks.pop(sandbox_id, None)

    async def _destroy(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self._destroy_sync, sandbox_id)

    def _destroy_sync(self, sandbox_id: str) -> None:
        directory = self._base / sandbox_id
        state = self._load(sandbox_id)
        child = self._children.pop(sandbox_id, None)
        if state is not None:
            cg = self._cg(state)
            # SIGKILL of a pid namespace's PID 1 kills every process in it; the cgroup sweep
            # catches anything that raced, and the frozen ones are thawed so they can die.
            if state.init_pid and state.pid_start and _start_time(state.pid) == state.pid_start:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(state.init_pid, signal.SIGKILL)
                if state.stopped:
                    for pid in _children_of(state.pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGCONT)
            cg.kill_all()
            cg.remove()
        if child is not None:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()  # the outer bubblewrap ends with its sandbox; this is a backstop
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
        elif state is not None and state.pid_start and _start_time(state.pid) == state.pid_start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.pid, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)

    # --- pause, resume ---------------------------------------------------------------------

    def _require(self, sandbox_id: str) -> _State:
        state = self._load(sandbox_id)
        if state is None:
            raise RuntimeError_(f"sandbox {sandbox_id} does not exist")
        if not self._alive(state):
            raise RuntimeError_(f"sandbox {sandbox_id} is not running: {self._log_tail(sandbox_id, 500)}")
        return state

    async def pause(self, sandbox_id: str) -> None:
        """Freeze every process of the sandbox (cgroup freezer; SIGSTOP of the process tree without one)."""
        self._dir(sandbox_id)
        async with self._lock(sandbox_id):
            state = self._require(sandbox_id)
            await asyncio.to_thread(self._pause_sync, state)

    def _pause_sync(self, state: _State) -> None:
        cg = self._cg(state)
        if cg.can_freeze:
            try:
                cg.freeze()
                return
            except OSError as err:
                raise RuntimeError_(f"cannot freeze sandbox {state.sandbox_id}: {err}") from err
        # Without a freezer: stop the tree top-down (a process forked in between is caught on the
        # second pass).
        for _ in range(2):
            for pid in _children_of(state.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        state.stopped = True
        self._save(self._base / state.sandbox_id, state)

    async def resume(self, sandbox_id: str) -> None:
        """Thaw a paused sandbox (a running one is left as it is)."""
        self._dir(sandbox_id)
        async with self._lock(sandbox_id):
            state = self._require(sandbox_id)
            await asyncio.to_thread(self._resume_sync, state)

    def _resume_sync(self, state: _State) -> None:
        cg = self._cg(state)
        if cg.can_freeze:
            try:
                cg.thaw()
            except OSError as err:
                raise RuntimeError_(f"cannot thaw sandbox {state.sandbox_id}: {err}") from err
        if state.stopped:
            for pid in _children_of(state.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            state.stopped = False
            self._save(self._base / state.sandbox_id, state)

    # --- snapshot --------------------------------------------------------------------------

    async def snapshot(self, sandbox_id: str, dest: Path) -> SnapshotResult:
        """Archive the writable layer (zstd, else gzip) while the sandbox is paused; memory is not kept."""
        self._dir(sandbox_id)
        async with self._lock(sandbox_id):
            state = self._require(sandbox_id)
            was_paused = self._info(state).paused
            if not was_paused:
                await asyncio.to_thread(self._pause_sync, state)
            try:
                return await self._archive(sandbox_id, Path(dest))
            finally:
                if not was_paused:
                    await asyncio.to_thread(self._resume_sync, state)

    async def _archive(self, sandbox_id: str, dest: Path) -> SnapshotResult:
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
            "-C",
            str(self._base / sandbox_id / "layer"),
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

    # --- list, close -----------------------------------------------------------------------

    async def list(self) -> list[SandboxInfo]:
        """Every sandbox with a state file; `running` is False when its bubblewrap is gone (or the pid was reused)."""
        return await asyncio.to_thread(self._list_sync)

    def _list_sync(self) -> builtins.list[SandboxInfo]:
        found: list[SandboxInfo] = []
        for entry in sorted(self._base.iterdir()):
            if not _ID_RE.match(entry.name) or not entry.is_dir():
                continue
            state = self._load(entry.name)
            if state is not None and state.pid:
                found.append(self._info(state))
        return found

    def pids(self, sandbox_id: str) -> builtins.list[int]:
        """Host pids of the sandbox's processes (its PID 1 and descendants); for tests and the bench."""
        state = self._load(sandbox_id)
        if state is None or not self._alive(state):
            return []
        return _children_of(state.pid)

    def init_pid(self, sandbox_id: str) -> int:
        """Host pid of the sandbox's PID 1 (0 if unknown)."""
        state = self._load(sandbox_id)
        return state.init_pid if state else 0

    async def close(self) -> None:
        """Forget our children without stopping them: sandboxes outlive instance_svc."""
        for child in self._children.values():
            child.poll()
        self._children.clear()
