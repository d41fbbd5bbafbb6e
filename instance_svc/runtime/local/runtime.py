"""`LocalRuntime`: the `Runtime` contract (instance_svc/runtime/base.py) over bubblewrap sandboxes.

This module holds the contract's entry points and their order of operations; each step lives in
the module named for it (see the package docstring). Concurrency: every operation on a sandbox
holds that sandbox's asyncio lock, so a delete never races a pause or a snapshot of the same
sandbox; the blocking parts (layer copies, /proc scans, cgroup writes) run in threads.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
import os
import re
import secrets
import subprocess
import time
from collections.abc import Collection
from pathlib import Path

from instance_svc.runtime.base import (
    AgentEndpoint,
    Limit,
    RuntimeError_,
    SandboxInfo,
    SandboxSpec,
    SnapshotResult,
)
from instance_svc.runtime.local import (
    agent_code,
    bwrap,
    disk,
    freezer,
    layers,
    network,
    procscan,
    snapshots,
    spawn,
    state_file,
)
from instance_svc.runtime.local.cgroups import CgroupManager, SandboxCgroups
from instance_svc.runtime.local.options import LocalOptions
from instance_svc.runtime.local.state_file import SandboxState
from instance_svc.runtime.local.teardown import destroy
from instance_svc.runtime.local.watch import ExitHandler, Watcher

_log = logging.getLogger("instance_svc.runtime.local")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MIB = 1024 * 1024
# A unix socket's path holds at most 107 bytes (sun_path is 108 with its NUL). The host reaches
# each agent at <base>/<sandbox>/sock/agent.sock; a longer path is refused by connect(), which
# grpc reports only as a target that never answers, so it is checked before anything starts.
_SOCKET_PATH_MAX = 107
_TYPICAL_SANDBOX_ID = "sb-000000000000"  # the form instance_svc gives its sandboxes


class LocalRuntime:
    """Runs each instance in a bubblewrap sandbox under `base` (see the package docstring)."""

    name = "local"

    def __init__(self, base: Path, options: LocalOptions | None = None) -> None:
        self._base = Path(base)
        self._base.mkdir(parents=True, exist_ok=True)
        os.chmod(self._base, 0o700)
        self._opts = options or LocalOptions()
        if self._socket_path_bytes(_TYPICAL_SANDBOX_ID) > _SOCKET_PATH_MAX:
            # Said once at the start, to the operator; every create that would hit it fails precisely.
            _log.warning(
                "the state directory %s is too long a path for the agents' unix sockets "
                "(<base>/%s/sock/agent.sock is %d bytes, at most %d): creates will fail; use a shorter one",
                self._base,
                _TYPICAL_SANDBOX_ID,
                self._socket_path_bytes(_TYPICAL_SANDBOX_ID),
                _SOCKET_PATH_MAX,
            )
        self._boots = asyncio.Semaphore(max(1, self._opts.parallel_boots))
        # Named after the base: the sweep of this runtime must never touch another one's sandboxes.
        group = f"cyberdesk-{procscan.base_tag(self._base)}"
        self._cgroups = CgroupManager(group=group) if self._opts.use_cgroups else None
        self._watcher = Watcher()
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._site = self._opts.site_packages or agent_code.site_packages()
        self._packages = self._opts.packages or tuple(agent_code.package_dirs())
        self._wm = bwrap.find_window_manager()
        self._locks: dict[str, asyncio.Lock] = {}
        # SIGSTOP of the process tree always works, so pause is supported either way; the
        # freezer is preferred because it stops a tree atomically (no fork escapes it).
        self.supports_pause = True

    # --- paths and recorded state ------------------------------------------------------------

    def _dir(self, sandbox_id: str) -> Path:
        if not _ID_RE.match(sandbox_id):
            raise RuntimeError_(
                f"sandbox id {sandbox_id!r} is not valid: use 1-63 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        return self._base / sandbox_id

    def _mark(self, sandbox_id: str) -> str:
        return procscan.mark(self._base, sandbox_id)

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _load(self, sandbox_id: str) -> SandboxState | None:
        return state_file.load(self._dir(sandbox_id))

    def _endpoint(self, sandbox_id: str, token: str) -> AgentEndpoint:
        return AgentEndpoint(target=f"unix://{self._base / sandbox_id / 'sock' / 'agent.sock'}", token=token)

    def _alive(self, state: SandboxState) -> bool:
        child = self._children.get(state.sandbox_id)
        if child is not None and child.poll() is not None:
            self._children.pop(state.sandbox_id, None)
        return procscan.start_time(state.pid) == state.pid_start

    def _info(self, state: SandboxState) -> SandboxInfo:
        running = self._alive(state)
        paused = freezer.is_paused(state, running)
        limits = tuple(Limit(**lim) for lim in state.limits)
        return SandboxInfo(state.sandbox_id, self._endpoint(state.sandbox_id, state.token), running, paused, limits)

    def _require(self, sandbox_id: str) -> SandboxState:
        state = self._load(sandbox_id)
        if state is None:
            raise RuntimeError_(f"sandbox {sandbox_id} does not exist")
        if not self._alive(state):
            tail = spawn.log_tail(self._base / sandbox_id, 500)
            raise RuntimeError_(f"sandbox {sandbox_id} is not running: {tail}")
        return state

    # --- create ----------------------------------------------------------------------------

    def _socket_path_bytes(self, sandbox_id: str) -> int:
        return len(os.fsencode(self._base / sandbox_id / "sock" / "agent.sock"))

    def _validate(self, spec: SandboxSpec) -> None:
        if self._socket_path_bytes(spec.sandbox_id) > _SOCKET_PATH_MAX:
            # No host path here: the message can reach the tenant as the create's failure.
            raise RuntimeError_(
                f"sandbox id {spec.sandbox_id!r} is too long for this host's state directory "
                f"(its agent socket path would exceed {_SOCKET_PATH_MAX} bytes)"
            )
        if spec.vcpus < 1 or spec.memory_mib < 16:
            raise RuntimeError_(f"a sandbox needs at least 1 vCPU and 16 MiB (got {spec.vcpus} and {spec.memory_mib})")
        if spec.disk_mib < 16:
            raise RuntimeError_(f"a sandbox's disk needs at least 16 MiB (got {spec.disk_mib})")
        for key, value in spec.env.items():
            if not _ENV_KEY_RE.match(key) or "\0" in value:
                raise RuntimeError_(f"environment variable {key!r} has an invalid name or a NUL byte")
        if spec.desktop is not None:
            width, height = spec.desktop
            if not (16 <= width <= 8192 and 16 <= height <= 8192):
                raise RuntimeError_(f"desktop size {width}x{height} is out of range (16..8192)")
        if spec.restore_from is not None and not Path(spec.restore_from).is_file():
            raise RuntimeError_(f"snapshot archive {spec.restore_from} does not exist")

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
                self._watcher.unwatch(spec.sandbox_id)
                await self._destroy(spec.sandbox_id)
                raise

    async def _start(self, spec: SandboxSpec, directory: Path) -> SandboxInfo:
        uid, gid = self._opts.sandbox_uid, self._opts.sandbox_gid
        hostname = spec.instance_id or spec.sandbox_id
        sock = directory / "sock"
        # The layer is the sandbox's own file system (disk.py): mounted before anything is written to it.
        mark = self._mark(spec.sandbox_id)
        layer = await asyncio.to_thread(disk.create, directory, spec.disk_mib, uid, gid, mark)
        await asyncio.to_thread(layers.prepare, layer, spec, hostname, uid, gid)
        sock.mkdir(mode=0o700)
        os.chown(sock, uid, gid)

        memory = spec.memory_mib * _MIB
        cg = (
            self._cgroups.create(spec.sandbox_id, memory, spec.vcpus, self._opts.pids_max)
            if self._cgroups
            else SandboxCgroups(version=0)
        )
        # The agent makes a cgroup per command inside these (one timeout kills all a command started).
        cgroup_binds = cg.delegate(uid, gid)
        limits = [
            Limit("memory_bytes", memory, "cgroup" if cg.enforced.get("memory_bytes") else "rlimit"),
            Limit("vcpus", spec.vcpus, "cgroup" if cg.enforced.get("vcpus") else "none"),
            Limit("pids", self._opts.pids_max, "cgroup" if cg.enforced.get("pids") else "none"),
            Limit("disk_bytes", spec.disk_mib * _MIB, "filesystem"),
        ]
        token = secrets.token_urlsafe(32)
        state = SandboxState(
            sandbox_id=spec.sandbox_id,
            pid=0,
            pid_start=0,
            init_pid=0,
            token=token,
            spec=state_file.spec_json(spec),
            cgroup_version=cg.version,
            cgroups=cg.paths,
            limits=[dataclasses.asdict(lim) for lim in limits],
            created_at=time.time(),
        )
        # Saved before the start so that a failed start still finds its cgroups to remove.
        state_file.save(directory, state)

        # At most `parallel_boots` sandboxes boot at once. A boot is mostly the agent's Python
        # start-up (CPU): twenty at once on two busy cores shared the CPU so thinly that agents
        # missed their ready_timeout (a fault test saw it); queued, each boots with the CPU it
        # needs. The timeout counts from the slot, so it bounds one boot, not the queue before it.
        async with self._boots:
            policy: network.Policy | None = None
            block_r = block_w = -1
            if spec.internet:
                # Host names are resolved now, at create time; one that does not resolve fails the create.
                policy = await asyncio.to_thread(
                    network.build_policy,
                    spec.egress_allow,
                    spec.egress_deny,
                    self._opts.egress_allow_ranges,
                    dns_upstream=self._opts.egress_dns_upstream,
                )
                block_r, block_w = os.pipe()
            launch = bwrap.Launch(
                layer=layer,
                sock_dir=sock,
                hostname=hostname,
                internet=spec.internet,
                uid=uid,
                gid=gid,
                python_prefix=self._opts.python_prefix,
                python=self._opts.python,
                site_packages=self._site,
                packages=self._packages,
                command=bwrap.agent_command(self._opts.python, spec.desktop, self._wm),
                cgroup_procs=cg.procs_files,
                stage=self._opts.stage_dir,
                data_rlimit=None if cg.enforced.get("memory_bytes") else memory,
                nested_userns=spec.nested_userns,
                cgroup_binds=cgroup_binds,
                block_fd=block_r,
            )
            try:
                proc, info_r = spawn.spawn_sandbox(directory, spec, launch, token, self._mark(spec.sandbox_id))
            finally:
                if block_r >= 0:
                    os.close(block_r)
            # Recorded before anything can fail, so that the cleanup of a failed start kills it.
            self._children[spec.sandbox_id] = proc
            state.pid = proc.pid
            try:
                try:
                    timeout = self._opts.ready_timeout
                    state.init_pid = await asyncio.to_thread(
                        spawn.read_init_pid, directory, spec.sandbox_id, info_r, proc, timeout
                    )
                finally:
                    os.close(info_r)
                start = procscan.start_time(proc.pid)
                if start is None:
                    raise RuntimeError_(f"the sandbox exited at once: {spawn.log_tail(directory)}")
                state.pid_start = start
                state_file.save(directory, state)
                if policy is not None:
                    # PID 1 is blocked on --block-fd: rules and slirp4netns are in place before it runs.
                    await asyncio.to_thread(
                        network.attach,
                        directory,
                        state.init_pid,
                        block_r,
                        policy,
                        uid,
                        gid,
                        cg.procs_files,
                        mark=self._mark(spec.sandbox_id),
                    )
                    os.write(block_w, b"1")
            finally:
                if block_w >= 0:
                    os.close(block_w)
            await spawn.wait_until_healthy(directory, spec.sandbox_id, proc, self._opts.ready_timeout)
        return self._info(state)

    # --- delete ----------------------------------------------------------------------------

    async def delete(self, sandbox_id: str) -> None:
        """Kill every process of the sandbox, remove its cgroups and its directory. Idempotent."""
        self._dir(sandbox_id)
        async with self._lock(sandbox_id):
            self._watcher.unwatch(sandbox_id)
            await self._destroy(sandbox_id)
        self._locks.pop(sandbox_id, None)

    async def _destroy(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self._destroy_sync, sandbox_id)

    def _destroy_sync(self, sandbox_id: str, strays: builtins.list[int] | None = None) -> None:
        state = self._load(sandbox_id)
        if strays is None:
            # Without a recorded, started bubblewrap the sandbox's processes are found by their mark.
            strays = procscan.marked(self._base).get(sandbox_id, []) if state is None or not state.pid_start else []
        found = self._cgroups.find(sandbox_id) if self._cgroups else None
        destroy(self._base / sandbox_id, state, self._children.pop(sandbox_id, None), found, strays)

    # --- the start-up sweep, and noticing a sandbox's death ------------------------------------

    async def sweep(self, keep: Collection[str]) -> builtins.list[str]:
        """Destroy everything of every sandbox under the base but `keep`; returns the ids destroyed.

        "Everything" is found on the host, not in records: directories under the base, processes
        carrying a sandbox's mark (procscan.MARK_ENV), cgroups under this runtime's group, mounts
        and loop devices of images under the base. Run at start-up, before any create.
        """
        return await asyncio.to_thread(self._sweep_sync, set(keep))

    def _sweep_sync(self, keep: set[str]) -> builtins.list[str]:
        procs = procscan.marked(self._base)
        found = {e.name for e in self._base.iterdir() if e.is_dir()}
        found |= procs.keys() | disk.owners(self._base)
        if self._cgroups is not None:
            found |= self._cgroups.existing()
        removed = []
        for sandbox_id in sorted(found - keep):
            if not _ID_RE.match(sandbox_id):
                continue
            self._destroy_sync(sandbox_id, procs.get(sandbox_id, []))
            removed.append(sandbox_id)
        return removed

    def watch(self, sandbox_id: str, on_exit: ExitHandler) -> None:
        """Call `on_exit(sandbox_id, reason)` on the loop once the sandbox's agent or bubblewrap exits by itself.

        Not for a delete of the runtime's own (delete stops the watch first). A sandbox that is
        already gone is reported at once.
        """
        state = self._load(sandbox_id)
        if state is None:
            self._watcher.watch(sandbox_id, 0, 0, 0, None, on_exit)
            return
        self._watcher.watch(
            sandbox_id, state.init_pid, state.pid, state.pid_start, self._children.get(sandbox_id), on_exit
        )

    # --- pause, resume ---------------------------------------------------------------------

    async def pause(self, sandbox_id: str) -> None:
        """Freeze every process of the sandbox (cgroup freezer; SIGSTOP of the process tree without one)."""
        self._dir(sandbox_id)
        async with self._lock(sandbox_id):
            state = self._require(sandbox_id)
            await asyncio.to_thread(freezer.freeze, self._base / sandbox_id, state)

    async def resume(self, sandbox_id: str) -> None:
        """Thaw a paused sandbox (a running one is left as it is)."""
        self._dir(sandbox_id)
        async with self._lock(sandbox_id):
            state = self._require(sandbox_id)
            await asyncio.to_thread(freezer.thaw, self._base / sandbox_id, state)

    # --- snapshot --------------------------------------------------------------------------

    async def snapshot(self, sandbox_id: str, dest: Path) -> SnapshotResult:
        """Archive the writable layer (zstd, else gzip) while the sandbox is paused; memory is not kept."""
        self._dir(sandbox_id)
        async with self._lock(sandbox_id):
            state = self._require(sandbox_id)
            already_paused = self._info(state).paused
            return await snapshots.take(self._base / sandbox_id, state, already_paused, Path(dest))

    # --- list, close -----------------------------------------------------------------------

    async def list(self) -> list[SandboxInfo]:
        """Every sandbox directory; `running` is False when its bubblewrap is gone, never ran, or the pid was reused."""
        return await asyncio.to_thread(self._list_sync)

    def _list_sync(self) -> builtins.list[SandboxInfo]:
        # This is how running sandboxes are found after a restart of instance_svc: the state
        # files under the base, each checked against the process it names.
        found: builtins.list[SandboxInfo] = []
        for entry in sorted(self._base.iterdir()):
            if not _ID_RE.match(entry.name) or not entry.is_dir():
                continue
            state = self._load(entry.name)
            if state is not None and state.pid:
                found.append(self._info(state))
            else:
                # A create cut short (instance_svc died before the sandbox ran): listed as not
                # running, so that whoever deletes what is listed also deletes its disk and cgroups.
                found.append(SandboxInfo(entry.name, self._endpoint(entry.name, ""), running=False))
        return found

    def pids(self, sandbox_id: str) -> builtins.list[int]:
        """Host pids of the sandbox's processes (its PID 1 and descendants); for tests and the bench."""
        state = self._load(sandbox_id)
        if state is None or not self._alive(state):
            return []
        return procscan.descendants(state.pid)

    def init_pid(self, sandbox_id: str) -> int:
        """Host pid of the sandbox's PID 1 (0 if unknown)."""
        state = self._load(sandbox_id)
        return state.init_pid if state else 0

    async def close(self) -> None:
        """Forget our children without stopping them: sandboxes outlive instance_svc."""
        self._watcher.close()
        for child in self._children.values():
            child.poll()
        self._children.clear()
