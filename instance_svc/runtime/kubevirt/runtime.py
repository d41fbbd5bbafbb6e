"""`KubevirtRuntime`: the `Runtime` contract over CyberdeskInstance resources and the instance operator.

instance_svc never talks to KubeVirt: it writes what it wants into the instance's resource (the
spec: paused, deadline; a CyberdeskSnapshot) and waits, on the shared watch, for the operator to
report it done (the status). How each contract call maps:

| call | writes | waits for |
| --- | --- | --- |
| create | nothing (the store wrote the resource with the reservation) | `Running` with `agentEndpoint` |
| delete | DELETE of the resource (our record finalizer keeps it) | the operator's finalizer gone (VM, Secret gone) |
| pause / resume | `spec.paused` | `Paused` / `Running` |
| snapshot | a CyberdeskSnapshot | its `Ready` |
| watch | - | `Expired` (reported as EXPIRED), `Failed`, the resource deleted by someone else |

After `Running`, create calls the agent's ConfigureAgent over TLS with the token of the Secret
`status.agentSecret`: it proves the agent answers, binds it to the instance and gives it the env.

The sandbox id is the instance id: one resource per instance, named by it, so a retried or
duplicated create can never make a second one (a POST of an existing name is a 409).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from instance_svc import agent_client
from instance_svc.operator import contract
from instance_svc.runtime.base import (
    EXPIRED,
    AgentEndpoint,
    Limit,
    RuntimeError_,
    SandboxInfo,
    SandboxSpec,
    SnapshotResult,
)
from instance_svc.runtime.kubevirt.kube import Kube, gone
from instance_svc.runtime.kubevirt.records import FINALIZER as RECORD_FINALIZER
from instance_svc.runtime.kubevirt.records import OWNER, lease_name, microtime, parse_time, record_of, snapshot_object
from instance_svc.runtime.kubevirt.watcher import Obj, Watcher
from instance_svc.states import State

_log = logging.getLogger("instance_svc.runtime.kubevirt")
T = TypeVar("T")


@dataclass(frozen=True)
class KubevirtOptions:
    """The knobs (CYBERDESK_KUBE_* settings, read in server.py)."""

    # A VM's boot (image pull, DataVolume import, cloud-init) can take minutes.
    ready_timeout_s: float = 600.0
    # Deleting, pausing, resuming: the operator's part only.
    change_timeout_s: float = 120.0
    snapshot_timeout_s: float = 600.0
    # Template -> CyberdeskWarmPool that a matching create claims from ("" or absent: none).
    warm_pools: tuple[tuple[str, str], ...] = ()
    # How long the resource of an ended instance stays as its record (GetInstance, ListInstances),
    # and how often a replica looks for records past it.
    record_retention_s: float = 3600.0
    gc_interval_s: float = 600.0
    # Each replica holds a Lease while it runs; a create whose replica's Lease lapsed is ended by
    # another replica (orphaned_starts). Renewed every third of it.
    lease_s: float = 15.0


def _status(obj: Obj | None) -> dict[str, Any]:
    return dict((obj or {}).get("status") or {})


def _why(obj: Obj | None) -> str:
    st = _status(obj)
    parts = [p for p in (st.get("reason"), st.get("message")) if p]
    return ": ".join(parts) or "no reason given"


class KubevirtRuntime:
    """Instances as KubeVirt VMs, through the instance operator (see the module docstring)."""

    name = "kubevirt"
    supports_pause = True
    # Records live in the cluster (KubeStore), seen by every replica: the start-up reconciliation
    # of one replica must not end what another is creating (lifecycle.py).
    shared_records = True

    def __init__(self, kube: Kube, options: KubevirtOptions | None = None, watcher: Watcher | None = None) -> None:
        self.kube = kube
        self.options = options or KubevirtOptions()
        self.watcher = watcher or Watcher(kube)
        self.snapshots = Watcher(kube, contract.SNAPSHOT_PLURAL)
        # Short blocking calls (a Secret read, a patch, a delete) off the event loop.
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kube")
        self._endpoints: dict[str, AgentEndpoint] = {}
        self._exits: dict[str, Callable[[str, str], None]] = {}
        self._started = False
        self._gc: asyncio.Task[None] | None = None
        self._renew: asyncio.Task[None] | None = None
        # Who this replica is, in the records it creates and in its Lease's name.
        host = "".join(c if c.isalnum() else "-" for c in socket.gethostname().lower()).strip("-")[:30]
        self.replica_id = f"{host or 'host'}-{os.getpid()}-{secrets.token_hex(3)}"

    def sandbox_id_for(self, instance_id: str) -> str:
        """The resource of an instance is named by its id."""
        return instance_id

    async def start(self) -> None:
        """Open the watches and wait for their first lists (also done by the first call)."""
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        self.watcher.listen(self._changed)
        self.watcher.start(loop)
        self.snapshots.start(loop)
        await self._call(self._hold_lease)
        self._renew = loop.create_task(self._renew_lease(), name="kubevirt-replica-lease")
        await self.watcher.synced(60)
        await self.snapshots.synced(60)
        self._gc = loop.create_task(self._collect_records(), name="kubevirt-record-gc")

    # --- this replica's Lease, and the creates of replicas that hold none any more ---------------

    @property
    def orphan_interval_s(self) -> float:
        """How often the lifecycle looks for creates of dead replicas (a third of a Lease)."""
        return max(1.0, self.options.lease_s / 3)

    @property
    def lease_name(self) -> str:
        """The Lease this replica renews while it runs."""
        return lease_name(self.replica_id)

    def _hold_lease(self) -> None:
        self.kube.put_lease(
            self.lease_name,
            {
                "holderIdentity": self.replica_id,
                "leaseDurationSeconds": max(1, round(self.options.lease_s)),
                "renewTime": microtime(time.time()),
            },
        )

    async def _renew_lease(self) -> None:
        while True:
            await asyncio.sleep(self.options.lease_s / 3)
            try:
                await self._call(self._hold_lease)
            except Exception as err:  # the API is down for a moment: the next renewal may make it
                _log.warning("replica lease not renewed", extra={"error": str(err)})

    def _lease_alive(self, owner: str, now: float) -> bool:
        lease = self.kube.lease(lease_name(owner))
        if lease is None:
            return False
        spec = lease.get("spec") or {}
        renewed = parse_time(str(spec.get("renewTime") or ""))
        return renewed is not None and now < renewed + float(spec.get("leaseDurationSeconds") or 0)

    async def orphaned_starts(self, starting: Collection[str]) -> builtins.list[str]:
        """Instances PENDING or STARTING (and not in `starting`, this replica's) whose replica's Lease lapsed.

        That replica died in the middle of the create: nobody will finish it (the env it carried
        is gone with it), so the caller ends it.
        """
        await self.start()
        now = time.time()
        alive: dict[str, bool] = {}
        found = []
        for obj in self.watcher.items():
            rec = record_of(obj)
            if rec is None or rec.state not in (State.PENDING, State.STARTING) or rec.id in starting:
                continue
            owner = (obj["metadata"].get("annotations") or {}).get(OWNER, "")
            if not owner or owner == self.replica_id:
                continue  # ours, or of no known replica: nothing to judge it by
            if owner not in alive:
                alive[owner] = bool(owner) and await self._call(self._lease_alive, owner, now)
            if not alive[owner]:
                found.append(rec.id)
        return found

    async def _collect_records(self) -> None:
        """Let the resources of instances ended longer than the retention ago go (every replica; idempotent)."""
        while True:
            await asyncio.sleep(self.options.gc_interval_s)
            horizon_us = int((time.time() - self.options.record_retention_s) * 1_000_000)
            for obj in self.watcher.items():
                rec = record_of(obj)
                if rec is None or not rec.state.terminal or not rec.end_time_us or rec.end_time_us > horizon_us:
                    continue
                name = obj["metadata"]["name"]
                try:
                    if not obj["metadata"].get("deletionTimestamp"):
                        await self._call(self.kube.delete, contract.INSTANCE_PLURAL, name)
                    await self._call(self._drop_finalizer, name)
                except Exception as err:
                    _log.warning("record not collected", extra={"instance_id": name, "error": str(err)})

    def _drop_finalizer(self, name: str) -> None:
        try:
            obj = self.kube.get(contract.INSTANCE_PLURAL, name)
        except Exception as err:
            if gone(err):
                return
            raise
        finalizers = [f for f in obj["metadata"].get("finalizers") or [] if f != RECORD_FINALIZER]
        meta = {"resourceVersion": obj["metadata"].get("resourceVersion"), "finalizers": finalizers}
        self.kube.patch(contract.INSTANCE_PLURAL, name, {"metadata": meta})

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # --- create ------------------------------------------------------------------------------

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        """Wait for the operator to run the instance's VM and its agent to answer; the sandbox."""
        await self.start()
        name = spec.sandbox_id

        def running(obj: Obj | None) -> bool:
            if obj is None:
                raise RuntimeError_("the instance's resource was deleted while it started")
            if obj["metadata"].get("deletionTimestamp"):
                raise RuntimeError_("the instance was deleted while it started")
            st = _status(obj)
            if st.get("phase") in contract.TERMINAL_PHASES:
                raise RuntimeError_(f"the operator reports {st.get('phase')}: {_why(obj)}")
            return st.get("phase") == contract.PHASE_RUNNING and bool(st.get("agentEndpoint"))

        try:
            obj = await self.watcher.wait_for(name, running, self.options.ready_timeout_s)
        except TimeoutError:
            phase = _status(self.watcher.get(name)).get("phase") or "no status"
            raise RuntimeError_(
                f"the VM was not running after {self.options.ready_timeout_s:g}s (phase {phase}: "
                f"{_why(self.watcher.get(name))})"
            ) from None
        except asyncio.CancelledError:
            # instance_svc is stopping: what was started goes (the record ends FAILED).
            with contextlib.suppress(Exception):
                await asyncio.shield(self._call(self.kube.delete, contract.INSTANCE_PLURAL, name))
            raise
        assert obj is not None
        endpoint = await self._endpoint(obj)
        await self._configure(endpoint, spec.instance_id or name, spec.env)
        return self._info(obj, endpoint)

    async def _configure(self, endpoint: AgentEndpoint, instance_id: str, env: dict[str, str]) -> None:
        """ConfigureAgent: proves the agent answers our token over TLS, binds it (idempotent), gives it the env.

        The operator had the agent answer before it said Running; a refused connection now is a
        moment's hiccup (the agent restarting), so UNAVAILABLE is retried for a few seconds.
        """
        for attempt in range(20):
            try:
                await agent_client.configure(endpoint, instance_id, env)
                return
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE and attempt < 19:
                    await asyncio.sleep(0.25)
                    continue
                # The code and the agent's own message only: the channel's debug string names addresses.
                raise RuntimeError_(
                    f"the VM's agent did not accept its configuration: {err.code().name}"
                    + (f": {err.details()}" if err.code() != grpc.StatusCode.UNAVAILABLE else "")
                ) from None

    async def _endpoint(self, obj: Obj) -> AgentEndpoint:
        name = obj["metadata"]["name"]
        st = _status(obj)
        target = str(st.get("agentEndpoint") or "")
        known = self._endpoints.get(name)
        if known is not None and known.target == target:
            return known
        secret = st.get("agentSecret") or contract.secret_name(st.get("vmName") or name)
        try:
            data = await self._call(self.kube.secret_data, secret)
        except Exception as err:
            raise RuntimeError_(f"the agent's Secret {secret} cannot be read: {getattr(err, 'reason', err)}") from None
        try:
            token = data[contract.SECRET_KEY_TOKEN].decode()
        except KeyError:
            raise RuntimeError_(f"the agent's Secret {secret} has no {contract.SECRET_KEY_TOKEN}") from None
        endpoint = AgentEndpoint(
            target=target,
            token=token,
            ca_pem=data.get(contract.SECRET_KEY_CA, b"").decode(),
            server_name=str(st.get("agentServerName") or ""),
        )
        self._endpoints[name] = endpoint
        return endpoint

    @staticmethod
    def _info(obj: Obj, endpoint: AgentEndpoint) -> SandboxInfo:
        res = (obj.get("spec") or {}).get("resources") or {}
        phase = _status(obj).get("phase")
        return SandboxInfo(
            sandbox_id=obj["metadata"]["name"],
            endpoint=endpoint,
            running=phase in (contract.PHASE_RUNNING, contract.PHASE_PAUSED),
            paused=phase == contract.PHASE_PAUSED,
            limits=(
                Limit("vcpus", int(res.get("vcpu", 0)), "kubevirt"),
                Limit("memory_bytes", int(res.get("memoryMiB", 0)) << 20, "kubevirt"),
                Limit("disk_bytes", int(res.get("diskMiB", 0)) << 20, "kubevirt"),
            ),
        )

    async def find(self, sandbox_id: str) -> SandboxInfo | None:
        """The sandbox when its VM runs (another replica may have started it); None otherwise."""
        await self.start()
        obj = self.watcher.get(sandbox_id)
        if obj is None or not _status(obj).get("agentEndpoint"):
            return None
        if _status(obj).get("phase") not in (contract.PHASE_RUNNING, contract.PHASE_PAUSED):
            return None
        return self._info(obj, await self._endpoint(obj))

    # --- delete ------------------------------------------------------------------------------

    async def delete(self, sandbox_id: str) -> None:
        """DELETE the resource and wait until the operator has removed the VM (its finalizer)."""
        await self.start()
        self._exits.pop(sandbox_id, None)
        self._endpoints.pop(sandbox_id, None)
        await self._call(self.kube.delete, contract.INSTANCE_PLURAL, sandbox_id)

        def torn_down(obj: Obj | None) -> bool:
            return obj is None or contract.FINALIZER not in (obj["metadata"].get("finalizers") or [])

        try:
            await self.watcher.wait_for(sandbox_id, torn_down, self.options.change_timeout_s)
        except TimeoutError:
            raise RuntimeError_(
                f"the operator did not remove the VM within {self.options.change_timeout_s:g}s"
            ) from None

    # --- pause and resume --------------------------------------------------------------------

    async def _set_paused(self, sandbox_id: str, paused: bool) -> None:
        await self.start()
        want = contract.PHASE_PAUSED if paused else contract.PHASE_RUNNING
        try:
            written = await self._call(
                self.kube.patch, contract.INSTANCE_PLURAL, sandbox_id, {"spec": {"paused": paused}}
            )
        except Exception as err:
            if gone(err):
                raise RuntimeError_("the instance's resource is gone") from None
            raise
        self.watcher.remember(written)
        generation = int(written["metadata"].get("generation") or 0)

        def reached(obj: Obj | None) -> bool:
            if obj is None:
                raise RuntimeError_("the instance's resource is gone")
            st = _status(obj)
            if st.get("phase") in contract.TERMINAL_PHASES:
                raise RuntimeError_(f"the operator reports {st.get('phase')}: {_why(obj)}")
            seen = int(st.get("observedGeneration") or 0)
            return st.get("phase") == want and (not generation or seen >= generation)

        try:
            await self.watcher.wait_for(sandbox_id, reached, self.options.change_timeout_s)
        except TimeoutError:
            verb = "pause" if paused else "resume"
            limit = self.options.change_timeout_s
            raise RuntimeError_(f"the operator did not {verb} the VM within {limit:g}s") from None

    async def pause(self, sandbox_id: str) -> None:
        """spec.paused = true; the operator calls KubeVirt's pause subresource."""
        await self._set_paused(sandbox_id, True)

    async def resume(self, sandbox_id: str) -> None:
        """spec.paused = false; the operator calls unpause."""
        await self._set_paused(sandbox_id, False)

    # --- snapshots ---------------------------------------------------------------------------

    async def snapshot(self, sandbox_id: str, dest: Path) -> SnapshotResult:
        """A CyberdeskSnapshot named as `dest` (the lifecycle's snapshot id), once Ready.

        Nothing is written to `dest`: the copy is a VirtualMachineSnapshot in the cluster; the
        path only names it in the record (a restore passes the snapshot's name as the instance's
        spec.sourceSnapshot).
        """
        await self.start()
        obj = self.watcher.get(sandbox_id)
        if obj is None:
            raise RuntimeError_("the instance's resource is gone")
        name = dest.stem
        body = snapshot_object(name, obj["spec"]["tenant"], sandbox_id, "")
        try:
            written = await self._call(self.kube.create, contract.SNAPSHOT_PLURAL, body)
        except Exception as err:
            if getattr(err, "status", 0) != 409:  # 409: a retry of ours, the same snapshot
                raise
            written = await self._call(self.kube.get, contract.SNAPSHOT_PLURAL, name)
        self.snapshots.remember(written)

        def ready(snap: Obj | None) -> bool:
            if snap is None:
                raise RuntimeError_("the snapshot was deleted while it was taken")
            phase = _status(snap).get("phase")
            if phase == contract.SNAPSHOT_PHASE_FAILED:
                raise RuntimeError_(f"the snapshot failed: {_why(snap)}")
            return phase == contract.SNAPSHOT_PHASE_READY

        try:
            snap = await self.snapshots.wait_for(name, ready, self.options.snapshot_timeout_s)
        except TimeoutError:
            with contextlib.suppress(Exception):
                await self._call(self.kube.delete, contract.SNAPSHOT_PLURAL, name)
            raise RuntimeError_(f"the snapshot was not ready after {self.options.snapshot_timeout_s:g}s") from None
        except BaseException:
            # A failed or abandoned snapshot leaves nothing behind (the operator deletes its copy).
            with contextlib.suppress(Exception):
                await asyncio.shield(self._call(self.kube.delete, contract.SNAPSHOT_PLURAL, name))
            raise
        st = _status(snap)
        return SnapshotResult(
            path=dest, size_bytes=int(st.get("sizeBytes") or 0), includes_memory=bool(st.get("includesMemory"))
        )

    # --- adoption, watch, close ----------------------------------------------------------------

    async def list(self) -> builtins.list[SandboxInfo]:
        """Every instance resource with a VM serving it (re-adoption after a restart)."""
        await self.start()
        out = []
        for obj in self.watcher.items():
            if obj["metadata"].get("deletionTimestamp"):
                continue
            st = _status(obj)
            running = st.get("phase") in (contract.PHASE_RUNNING, contract.PHASE_PAUSED) and st.get("agentEndpoint")
            if running:
                try:
                    out.append(self._info(obj, await self._endpoint(obj)))
                    continue
                except RuntimeError_ as err:
                    _log.warning("cannot re-adopt", extra={"sandbox_id": obj["metadata"]["name"], "error": str(err)})
            out.append(SandboxInfo(sandbox_id=obj["metadata"]["name"], endpoint=AgentEndpoint("", ""), running=False))
        return out

    async def sweep(self, keep: Collection[str]) -> builtins.list[str]:
        """Nothing to sweep: every resource is a record (the lifecycle ends the ones it decides to end)."""
        return []

    def watch(self, sandbox_id: str, on_exit: Callable[[str, str], None]) -> None:
        """Report once when the instance's VM ends without us: Expired (EXPIRED), Failed, deleted by others."""
        self._exits[sandbox_id] = on_exit
        obj = self.watcher.get(sandbox_id)
        if obj is None and self.watcher.is_synced:
            self._changed(sandbox_id, None)
        elif obj is not None:
            self._changed(sandbox_id, obj)

    def _changed(self, name: str, obj: Obj | None) -> None:
        callback = self._exits.get(name)
        if callback is None:
            return
        st = _status(obj)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            reason = "the instance's resource was deleted"
        elif st.get("phase") == contract.PHASE_EXPIRED:
            reason = EXPIRED
        elif st.get("phase") == contract.PHASE_FAILED:
            reason = f"the VM failed: {_why(obj)}"
        else:
            return
        del self._exits[name]
        self._endpoints.pop(name, None)
        callback(name, reason)

    async def close(self) -> None:
        """Stop the watches and the client (the VMs go on: they outlive instance_svc)."""
        for task in (self._gc, self._renew):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._renew is not None:
            # Gone at once rather than lapsed: another replica may end this one's cut-short creates now.
            with contextlib.suppress(Exception):
                await self._call(self.kube.delete_lease, self.lease_name)
        self.watcher.stop()
        self.snapshots.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.kube.close()
