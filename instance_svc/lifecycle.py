"""The orchestration of instances: create, delete, pause, resume, deadlines, snapshots, start-up.

Concurrency: every operation that changes an instance holds that instance's asyncio lock for
its whole duration (including the runtime call), so a delete racing an expiry or a resume runs
after it and sees its result. A create takes the lock of its new id before the record exists,
so nothing can act on a PENDING instance. Quota and idempotency checks are atomic in the store.

Everything it works with is handed in (store, runtime, publisher, pool, clock), so the unit tests
drive it with a fake Runtime, a fake clock and a real SQLite store in a temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from cyberdesk_common.log import mask_paths
from cyberdesk_common.status import RpcError, failed_precondition, invalid_argument, not_found, resource_exhausted
from instance_svc import expiry
from instance_svc.billing import NO_BILLING, PlanGate
from instance_svc.clock import SYSTEM_CLOCK, Clock
from instance_svc.pool import WarmPool
from instance_svc.quotas import QuotaTable
from instance_svc.runtime.base import EXPIRED, Runtime, SandboxInfo, SandboxSpec, Unsupported
from instance_svc.scheduler import Scheduler
from instance_svc.states import IllegalRequest, Request, State, check_request
from instance_svc.store import InstanceRecord, QuotaExceeded, SnapshotRecord, Store
from instance_svc.validation import TEMPLATE_DISK_MIB, CreateSpec

_log = logging.getLogger("instance_svc.lifecycle")

# Why a record no sandbox backs any more is FAILED (state_message): what happened, as far as it is known.
VANISHED = "the sandbox's processes were gone when instance_svc restarted"
FILES_GONE = "the sandbox's files were gone when instance_svc restarted"
INTERRUPTED = "instance_svc restarted while the sandbox was being created"
STOPPED_STARTING = "instance_svc stopped while the sandbox was being created"
_DRAIN_WAIT_STEPS = 100  # of 20 ms
# The reason of instances ended by a stop of instance_svc with INSTANCE_SVC_ON_SHUTDOWN=end.
STACK_STOPPED = "the stack was stopped"
# With records shared by several replicas (kubevirt): the reason of a create whose replica died.
REPLICA_DIED = "the instance_svc replica creating it stopped before it was running"


@contextlib.contextmanager
def _precondition() -> Iterator[None]:
    try:
        yield
    except IllegalRequest as err:
        raise failed_precondition(err.message) from None


class EventPublisher(Protocol):
    """What the lifecycle needs of the outbox publisher (instance_svc/events.py `Publisher`)."""

    def start(self) -> None:
        """Start draining the outbox in the background."""
        ...

    def kick(self) -> None:
        """New outbox rows exist."""
        ...

    async def stop(self) -> None:
        """Stop draining."""
        ...


@dataclass(frozen=True)
class Resolved:
    """An instance and, when it is RUNNING, its agent."""

    record: InstanceRecord
    sandbox: SandboxInfo | None


class Lifecycle:
    """Owns the instances of one instance_svc: records, sandboxes, deadlines and events."""

    def __init__(
        self,
        store: Store,
        runtime: Runtime,
        quotas: QuotaTable,
        publisher: EventPublisher,
        pool: WarmPool,
        snapshot_dir: Path,
        clock: Clock = SYSTEM_CLOCK,
        billing: PlanGate = NO_BILLING,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.quotas = quotas
        self.publisher = publisher
        self.pool = pool
        self.snapshot_dir = snapshot_dir
        self.clock = clock
        # The tenant's plan (billing_svc), asked before every create and SetTimeout.
        self.billing = billing
        self.scheduler = Scheduler(self._on_deadline, clock)
        self.ready = asyncio.Event()
        # Agent endpoints (with their tokens) live only in memory; runtime.list() restores them.
        self._sandboxes: dict[str, SandboxInfo] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._starting: dict[str, asyncio.Future[None]] = {}
        # Creates run as tasks of their own: a caller that goes away does not cut its create short
        # (a retry with the same request_id waits for it instead).
        self._create_tasks: dict[str, asyncio.Task[InstanceRecord]] = {}
        self._creates: set[asyncio.Task[InstanceRecord]] = set()
        self._background: set[asyncio.Task[None]] = set()
        # Shared records only (kubevirt): the check for creates whose replica died.
        self._orphans: asyncio.Task[None] | None = None
        # How long (in steps of 20 ms) a stop waits for the last events to leave the outbox; the
        # unit tests' publisher never sends, so they set 0.
        self.outbox_wait_steps = _DRAIN_WAIT_STEPS

    def _public(self, err: Exception) -> str:
        """A runtime error's text as a tenant may read it: no path of the state directory (see mask_paths)."""
        return mask_paths(str(err), self.snapshot_dir.parent)

    # --- start and stop ----------------------------------------------------------------------

    async def start(self) -> None:
        """Reconcile records with the sandboxes that exist, re-arm deadlines, start background tasks."""
        self.publisher.start()
        await self._reconcile()
        self.scheduler.start()
        self.pool.start()
        self.ready.set()

    async def stop(self, end_instances: bool = False, budget: float = 10.0) -> None:
        """Stop background work; with `end_instances`, first end every live instance ("the stack was stopped").

        Without it sandboxes keep running and the next start re-adopts them. With it, each live
        instance's sandbox is deleted (in parallel, for at most `budget` seconds) and its record ends
        TERMINATED with end_time now; the publisher's last drain sends their events.
        """
        await self.scheduler.stop()
        await self.pool.stop()
        if self._orphans is not None:
            self._orphans.cancel()
            await asyncio.gather(self._orphans, return_exceptions=True)
        if end_instances:
            await self._end_all(budget)
        for task in list(self._creates):
            task.cancel()
        await asyncio.gather(*self._creates, return_exceptions=True)
        # Let the publisher send the last changes (the instances just ended, the calls just drained)
        # before it is stopped: cancelled in the middle of a drain, its Redis client was seen never
        # to return (instance_svc hung on SIGTERM until killed). Bounded, for a Redis that is down.
        for _ in range(self.outbox_wait_steps):
            if not self.store.unsent(1):
                break
            await asyncio.sleep(0.02)
        await self.publisher.stop()
        await self.runtime.close()

    async def _end_all(self, budget: float) -> None:
        async def end(rec: InstanceRecord) -> None:
            # A create still starting is cancelled first: it deletes what it started, and its
            # record then ends here.
            task = self._create_tasks.get(rec.id)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            async with self._locks[rec.id]:
                fresh = self.store.get(rec.id)
                if fresh is None or fresh.state.terminal:
                    return
                if fresh.state is State.PENDING:
                    self._set(rec.id, State.FAILED, STACK_STOPPED)
                    return
                await self._terminate(rec.id, STACK_STOPPED)

        live = self.store.live()
        if not live:
            return
        _log.info("ending every instance", extra={"count": len(live)})
        try:
            await asyncio.wait_for(asyncio.gather(*(end(r) for r in live), return_exceptions=True), budget)
        except TimeoutError:
            _log.warning("not every instance ended in time", extra={"budget_s": budget})

    async def _reconcile(self) -> None:
        """Make records and the host agree after a restart (also after a kill -9 at any point).

        Every live record is decided first: RUNNING or PAUSED with a running sandbox is re-adopted
        (and its freezer made to agree with the record: a pause or snapshot cut short leaves it
        frozen); every other live record is ended. Then everything of every sandbox no re-adopted
        record owns is destroyed (runtime.sweep: processes, files, cgroups, mounts found on the
        host), and only then are the ended records written, so a record says FAILED or TERMINATED
        only once its sandbox is gone. A crash in between repeats the same decisions next time.
        """
        if getattr(self.runtime, "shared_records", False):
            await self._reconcile_shared()
            return
        existing = {info.sandbox_id: info for info in await self.runtime.list()}
        keep: set[str] = set()
        ends: list[tuple[str, State, str]] = []
        for rec in self.store.live():
            info = existing.get(rec.sandbox_id) if rec.sandbox_id else None
            if rec.state in (State.RUNNING, State.PAUSED):
                if info is not None and info.running:
                    keep.add(info.sandbox_id)
                    self._sandboxes[rec.id] = info
                    await self._align_pause(rec, info)
                    self.scheduler.arm(rec.id, rec.expire_time_us)
                    self.runtime.watch(info.sandbox_id, self._on_sandbox_exit)
                    _log.info("re-adopted", extra={"instance_id": rec.id, "state": rec.state.name})
                else:
                    reason = VANISHED if info is not None else FILES_GONE
                    _log.warning("sandbox gone", extra={"instance_id": rec.id, "sandbox_id": rec.sandbox_id})
                    ends.append((rec.id, State.FAILED, reason))
            elif rec.state in (State.PENDING, State.STARTING):
                ends.append((rec.id, State.FAILED, INTERRUPTED))
            elif rec.state is State.STOPPING:
                # The delete was cut short: the sweep finishes it.
                ends.append((rec.id, State.TERMINATED, "deleted"))
        try:
            removed = await self.runtime.sweep(keep)
        except Exception as err:
            _log.warning("start-up sweep failed", extra={"error": str(err)})
        else:
            if removed:
                _log.info("destroyed sandboxes no record owns", extra={"sandbox_ids": removed})
        for instance_id, state, reason in ends:
            self._set(instance_id, state, reason)
        self._sweep_snapshots()

    async def _reconcile_shared(self) -> None:
        """The start-up reconciliation of one replica among several that share the records (kubevirt).

        Nothing is swept (every resource of the cluster is a record), and a create in progress is
        not ended because of its state: another replica may be running it. A PENDING or STARTING
        record is ended FAILED only when the replica that creates it holds no Lease any more (it
        died; checked now and then every few seconds, runtime.orphaned_starts), an interrupted
        delete is finished, and a RUNNING or PAUSED record whose VM is gone ends:
        TERMINATED when its deadline had passed (the operator expired it while no replica
        watched), FAILED otherwise. Every replica re-arms and watches every live instance; two
        replicas acting on the same one meet at the record's conditional writes.
        """
        existing = {info.sandbox_id: info for info in await self.runtime.list()}
        now = self.clock.now_us()
        for rec in self.store.live():
            info = existing.get(rec.sandbox_id)
            async with self._locks[rec.id]:
                try:
                    if rec.state in (State.RUNNING, State.PAUSED):
                        if info is not None and info.running:
                            self._sandboxes[rec.id] = info
                            self.scheduler.arm(rec.id, rec.expire_time_us)
                            self.runtime.watch(info.sandbox_id, self._on_sandbox_exit)
                        elif rec.expire_time_us <= now:
                            await self._terminate(rec.id, EXPIRED)
                        else:
                            await self.runtime.delete(rec.sandbox_id)
                            self._set(rec.id, State.FAILED, VANISHED)
                    elif rec.state is State.STOPPING:
                        await self._terminate(rec.id, "deleted")
                except Exception as err:  # another replica changed it meanwhile, or the API failed
                    _log.warning("not reconciled", extra={"instance_id": rec.id, "error": str(err)})
        await self._end_orphaned_starts()
        self._orphans = asyncio.get_running_loop().create_task(self._watch_orphaned_starts(), name="orphaned-starts")

    async def _watch_orphaned_starts(self) -> None:
        interval = float(getattr(self.runtime, "orphan_interval_s", 5.0))
        while True:
            await asyncio.sleep(interval)
            try:
                await self._end_orphaned_starts()
            except Exception as err:
                _log.warning("orphaned creates not checked", extra={"error": str(err)})

    async def _end_orphaned_starts(self) -> None:
        """End the PENDING and STARTING records whose replica died (its Lease lapsed): nobody will finish them."""
        for instance_id in await self.runtime.orphaned_starts(set(self._starting)):  # type: ignore[attr-defined]
            async with self._locks[instance_id]:
                rec = self.store.get(instance_id)
                if rec is None or rec.state not in (State.PENDING, State.STARTING) or instance_id in self._starting:
                    continue
                _log.warning("ending a create whose replica died", extra={"instance_id": instance_id})
                try:
                    await self.runtime.delete(rec.sandbox_id)
                except Exception as err:
                    _log.warning("orphaned create not deleted", extra={"instance_id": instance_id, "error": str(err)})
                    continue
                self._set(instance_id, State.FAILED, REPLICA_DIED)

    async def _align_pause(self, rec: InstanceRecord, info: SandboxInfo) -> None:
        try:
            if rec.state is State.RUNNING and info.paused:
                await self.runtime.resume(info.sandbox_id)
                _log.info("thawed a sandbox left frozen", extra={"instance_id": rec.id})
            elif rec.state is State.PAUSED and not info.paused:
                await self.runtime.pause(info.sandbox_id)
                _log.info("froze a sandbox left running", extra={"instance_id": rec.id})
        except Exception as err:
            _log.warning("pause state not aligned", extra={"instance_id": rec.id, "error": str(err)})

    def _sweep_snapshots(self) -> None:
        """Archives no snapshot record names: a snapshot cut short (`.partial`, or written but not recorded)."""
        if not self.snapshot_dir.is_dir():
            return
        recorded = self.store.snapshot_paths()
        for path in self.snapshot_dir.iterdir():
            if str(path) not in recorded and path.is_file():
                _log.info("removing an unrecorded snapshot archive", extra={"file": path.name})
                path.unlink(missing_ok=True)

    # --- a sandbox that dies by itself --------------------------------------------------------

    def _on_sandbox_exit(self, sandbox_id: str, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._sandbox_died(sandbox_id, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _sandbox_died(self, sandbox_id: str, reason: str) -> None:
        """The instance of a dead sandbox ends FAILED with the reason; its sandbox is torn down first.

        Not restarted in place: the tenant's processes died with the agent (a sandbox's PID 1),
        so a new agent would be a different machine under the same id (docs/instance_svc.md).
        """
        rec = self.store.by_sandbox(sandbox_id)
        if rec is None:
            return
        async with self._locks[rec.id]:
            rec = self.store.get(rec.id)
            if rec is None or rec.sandbox_id != sandbox_id or rec.state not in (State.RUNNING, State.PAUSED):
                return  # a delete, deadline or restart got there first
            if reason == EXPIRED:
                # The platform's own deadline timer got there first (kubevirt's operator).
                await self._terminate(rec.id, EXPIRED)
                return
            _log.warning("sandbox died", extra={"instance_id": rec.id, "sandbox_id": sandbox_id, "reason": reason})
            self.scheduler.cancel(rec.id)
            self._sandboxes.pop(rec.id, None)
            try:
                await self.runtime.delete(sandbox_id)
            except Exception as err:
                reason += f"; the runtime could not delete the sandbox: {self._public(err)}"
            self._set(rec.id, State.FAILED, reason)

    # --- helpers -----------------------------------------------------------------------------

    def _set(self, instance_id: str, state: State, message: str | None = None, **changes: object) -> InstanceRecord:
        rec = self.store.transition(instance_id, state, self.clock.now_us(), message, **changes)
        self.publisher.kick()
        return rec

    def owned(self, tenant: str, instance_id: str) -> InstanceRecord:
        """The tenant's instance, or NOT_FOUND (also when another tenant owns it)."""
        if not instance_id:
            raise invalid_argument("instance_id is required")
        rec = self.store.get(instance_id)
        if rec is None or rec.tenant != tenant:
            raise not_found(f"instance {instance_id} not found")
        return rec

    def owned_snapshot(self, tenant: str, snapshot_id: str) -> SnapshotRecord:
        """The tenant's snapshot, or NOT_FOUND."""
        if not snapshot_id:
            raise invalid_argument("snapshot_id is required")
        snap = self.store.get_snapshot(snapshot_id)
        if snap is None or snap.tenant != tenant:
            raise not_found(f"snapshot {snapshot_id} not found")
        return snap

    async def _settled(self, rec: InstanceRecord) -> InstanceRecord:
        """The instance once its create has finished (a retried create waits for the first)."""
        pending = self._starting.get(rec.id)
        if pending is not None:
            await asyncio.shield(pending)
        fresh = self.store.get(rec.id)
        assert fresh is not None
        if pending is None and getattr(self.runtime, "shared_records", False):
            # Another replica runs this create: wait for its outcome as for one of our own (or for
            # the end the orphan check writes should that replica die).
            while fresh.state in (State.PENDING, State.STARTING):
                await asyncio.sleep(0.05)
                found = self.store.get(rec.id)
                assert found is not None
                fresh = found
        return fresh

    def _sandbox_id(self, instance_id: str) -> str:
        """The sandbox a new instance gets: "sb-<hex>" here, the runtime's own name where it has one (kubevirt)."""
        name_for = getattr(self.runtime, "sandbox_id_for", None)
        return str(name_for(instance_id)) if name_for else "sb-" + instance_id.removeprefix("i-")

    # --- create ------------------------------------------------------------------------------

    async def create(self, tenant: str, spec: CreateSpec) -> InstanceRecord:
        """Create an instance and return it RUNNING, or FAILED with the runtime's reason."""
        snapshot: SnapshotRecord | None = None
        template = spec.template
        if spec.snapshot_id:
            snapshot = self.owned_snapshot(tenant, spec.snapshot_id)
            template = snapshot.template
        disk_mib = self._disk_for(spec, template, snapshot)
        if spec.request_id:
            earlier = self.store.by_request_id(tenant, spec.request_id)
            if earlier is not None:
                return await self._settled(earlier)
        instance_id = "i-" + secrets.token_hex(6)
        now = self.clock.now_us()
        rec = InstanceRecord(
            id=instance_id,
            tenant=tenant,
            template=template,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            disk_mib=disk_mib,
            state=State.PENDING,
            create_time_us=now,
            expire_time_us=expiry.deadline(now, spec.timeout_us),
            timeout_us=spec.timeout_us,
            timeout_action=spec.timeout_action,
            runtime=self.runtime.name,
            labels=spec.labels,
            desktop=spec.desktop,
            internet=spec.internet,
            source_snapshot_id=spec.snapshot_id,
            # Recorded with the reservation, before anything of the sandbox exists on the host.
            sandbox_id=self._sandbox_id(instance_id),
            request_id=spec.request_id or None,
            egress_allow=spec.egress_allow,
            egress_deny=spec.egress_deny,
        )
        task = asyncio.get_running_loop().create_task(self._create(rec, spec, snapshot))
        self._create_tasks[instance_id] = task
        self._creates.add(task)

        def forget(done: asyncio.Task[InstanceRecord]) -> None:
            self._creates.discard(done)
            if self._create_tasks.get(instance_id) is done:
                del self._create_tasks[instance_id]

        task.add_done_callback(forget)
        return await asyncio.shield(task)

    async def _create(self, rec: InstanceRecord, spec: CreateSpec, snapshot: SnapshotRecord | None) -> InstanceRecord:
        instance_id, tenant = rec.id, rec.tenant
        async with self._locks[instance_id]:
            # The plan first (one RPC; it reserves the instance's share in billing_svc's ledger),
            # then the host's quota. A create that goes no further frees the plan's reservation;
            # one that fails later frees it with its FAILED event.
            await self.billing.admit_create(
                tenant, instance_id, rec.vcpus, rec.memory_mib, rec.disk_mib, rec.desktop is not None, rec.timeout_us
            )
            try:
                # The reservation (quota, request_id, sandbox id) is committed before the spawn:
                # after a crash at any later point the restart finds the record and ends it.
                rec, created = self.store.insert_within_quota(rec, self.quotas.for_tenant(tenant))
            except QuotaExceeded as err:
                await self.billing.release(tenant, instance_id)
                raise resource_exhausted(str(err)) from None
            except BaseException:
                await self.billing.release(tenant, instance_id)
                raise
            if not created:
                await self.billing.release(tenant, instance_id)
                return await self._settled(rec)
            done = asyncio.get_running_loop().create_future()
            self._starting[instance_id] = done
            self.publisher.kick()
            try:
                return await self._start(rec, spec, snapshot)
            except asyncio.CancelledError:
                # instance_svc is stopping: runtime.create deleted what it had started.
                fresh = self.store.get(instance_id)
                if fresh is not None and not fresh.state.terminal:
                    self._set(instance_id, State.FAILED, STOPPED_STARTING)
                raise
            finally:
                done.set_result(None)
                del self._starting[instance_id]

    def _disk_for(self, spec: CreateSpec, template: str, snapshot: SnapshotRecord | None) -> int:
        """The disk of a new instance: the request's, else a restore's snapshot's size, else the template's.

        A snapshot's files were written to a disk of its instance's size; restored into a smaller
        one they may not fit, so that is refused before anything starts (INVALID_ARGUMENT).
        """
        if snapshot is None:
            return spec.disk_mib
        source = self.store.get(snapshot.instance_id)
        needed = source.disk_mib if source is not None else 0
        if not spec.disk_mib_requested:
            return needed or TEMPLATE_DISK_MIB.get(template, spec.disk_mib)
        if spec.disk_mib < needed:
            raise invalid_argument(
                f"disk_mib {spec.disk_mib} is smaller than the {needed} MiB disk snapshot {snapshot.id} was taken "
                f"of; restore it into at least {needed} MiB"
            )
        return spec.disk_mib

    async def _start(self, rec: InstanceRecord, spec: CreateSpec, snapshot: SnapshotRecord | None) -> InstanceRecord:
        self._set(rec.id, State.STARTING)
        sandbox_id = rec.sandbox_id
        try:
            info = await self.pool.claim(spec, rec.id)
            if info is None:
                info = await self.runtime.create(
                    SandboxSpec(
                        sandbox_id=sandbox_id,
                        template=rec.template,
                        vcpus=rec.vcpus,
                        memory_mib=rec.memory_mib,
                        disk_mib=rec.disk_mib,
                        instance_id=rec.id,
                        env=spec.env,
                        desktop=spec.desktop,
                        internet=spec.internet,
                        egress_allow=spec.egress_allow,
                        egress_deny=spec.egress_deny,
                        restore_from=Path(snapshot.path) if snapshot else None,
                    )
                )
        except Exception as err:
            _log.warning("create failed", extra={"instance_id": rec.id, "error": str(err)})
            with contextlib.suppress(Exception):
                await self.runtime.delete(sandbox_id)
            # FAILED is terminal: the quota slot is free again from this commit on.
            return self._set(rec.id, State.FAILED, f"the runtime could not start the instance: {self._public(err)}")
        self._sandboxes[rec.id] = info
        limits = [(lim.name, lim.value, lim.mechanism) for lim in info.limits]
        # A claimed pool sandbox has its own id: the record takes it with the RUNNING state.
        done = self._set(rec.id, State.RUNNING, "", sandbox_id=info.sandbox_id, limits=limits)
        self.scheduler.arm(rec.id, done.expire_time_us)
        self.runtime.watch(info.sandbox_id, self._on_sandbox_exit)
        return done

    # --- delete and deadlines ----------------------------------------------------------------

    async def delete(self, tenant: str, instance_id: str) -> InstanceRecord:
        """Terminate the instance; a terminated (or failed) one is returned unchanged."""
        self.owned(tenant, instance_id)
        async with self._locks[instance_id]:
            return await self._terminate(instance_id, "deleted")

    async def _terminate(self, instance_id: str, message: str) -> InstanceRecord:
        rec = self.store.get(instance_id)
        assert rec is not None
        if rec.state.terminal:
            return rec
        if rec.state is not State.STOPPING:
            self._set(instance_id, State.STOPPING)
        self.scheduler.cancel(instance_id)
        self._sandboxes.pop(instance_id, None)
        if rec.sandbox_id:
            try:
                await self.runtime.delete(rec.sandbox_id)
            except Exception as err:
                message = f"the runtime could not delete the sandbox: {self._public(err)}"
                return self._set(instance_id, State.FAILED, message)
        return self._set(instance_id, State.TERMINATED, message)

    async def _on_deadline(self, instance_id: str) -> None:
        async with self._locks[instance_id]:
            rec = self.store.get(instance_id)
            if rec is None or rec.state not in (State.RUNNING, State.PAUSED):
                return
            now = self.clock.now_us()
            if rec.expire_time_us > now:  # moved meanwhile
                self.scheduler.arm(instance_id, rec.expire_time_us)
                return
            action = expiry.effective_action(rec.timeout_action, self.runtime.supports_pause)
            if action is expiry.TimeoutAction.PAUSE:
                if rec.state is State.PAUSED:
                    return
                try:
                    await self.runtime.pause(rec.sandbox_id)
                    self._set(instance_id, State.PAUSED, "paused at its deadline")
                    return
                except Unsupported as err:
                    _log.info("pause unsupported; terminating", extra={"instance_id": instance_id, "error": str(err)})
            await self._terminate(instance_id, "expired at its deadline")

    async def set_timeout(self, tenant: str, instance_id: str, timeout_us: int) -> InstanceRecord:
        """Move the deadline to now + timeout."""
        problem = expiry.check_timeout(timeout_us)
        if problem:
            raise invalid_argument(problem)
        self.owned(tenant, instance_id)
        async with self._locks[instance_id]:
            rec = self.store.get(instance_id)
            assert rec is not None
            with _precondition():
                check_request(instance_id, rec.state, Request.SET_TIMEOUT)
            await self.billing.admit_timeout(tenant, instance_id, timeout_us)
            rec = self.store.update(
                instance_id, expire_time_us=expiry.deadline(self.clock.now_us(), timeout_us), timeout_us=timeout_us
            )
            if rec.state in (State.RUNNING, State.PAUSED):
                self.scheduler.arm(instance_id, rec.expire_time_us)
            return rec

    # --- pause and resume --------------------------------------------------------------------

    async def pause(self, tenant: str, instance_id: str) -> InstanceRecord:
        """Freeze a RUNNING instance (where the runtime can)."""
        self.owned(tenant, instance_id)
        async with self._locks[instance_id]:
            rec = self.store.get(instance_id)
            assert rec is not None
            with _precondition():
                check_request(instance_id, rec.state, Request.PAUSE)
            if not self.runtime.supports_pause:
                raise failed_precondition(f"the {self.runtime.name} runtime cannot pause instances on this host")
            try:
                await self.runtime.pause(rec.sandbox_id)
            except Unsupported as err:
                raise failed_precondition(f"instance {instance_id} cannot be paused: {self._public(err)}") from None
            return self._set(instance_id, State.PAUSED, "paused")

    async def resume(self, tenant: str, instance_id: str) -> InstanceRecord:
        """Thaw a PAUSED instance; one paused by its deadline gets its timeout again from now."""
        self.owned(tenant, instance_id)
        async with self._locks[instance_id]:
            rec = self.store.get(instance_id)
            assert rec is not None
            with _precondition():
                check_request(instance_id, rec.state, Request.RESUME)
            try:
                await self.runtime.resume(rec.sandbox_id)
            except Unsupported as err:
                raise failed_precondition(f"instance {instance_id} cannot be resumed: {self._public(err)}") from None
            new_deadline = expiry.resume_deadline(rec.expire_time_us, self.clock.now_us(), rec.timeout_us)
            rec = self._set(instance_id, State.RUNNING, "", expire_time_us=new_deadline)
            self.scheduler.arm(instance_id, rec.expire_time_us)
            return rec

    # --- routing -----------------------------------------------------------------------------

    def resolve(self, tenant: str, instance_id: str) -> Resolved:
        """The instance and, when RUNNING, its agent endpoint."""
        rec = self.owned(tenant, instance_id)
        return Resolved(rec, self._sandboxes.get(instance_id) if rec.state is State.RUNNING else None)

    async def route(self, tenant: str, instance_id: str) -> Resolved:
        """`resolve`, also for an instance another replica started (records shared in the cluster)."""
        resolved = self.resolve(tenant, instance_id)
        find = getattr(self.runtime, "find", None)
        if resolved.sandbox is None and resolved.record.state is State.RUNNING and find is not None:
            info = await find(resolved.record.sandbox_id)
            if info is not None:
                self._sandboxes[instance_id] = info
            return Resolved(resolved.record, info)
        return resolved

    # --- snapshots ---------------------------------------------------------------------------

    async def snapshot(self, tenant: str, instance_id: str, display_name: str) -> SnapshotRecord:
        """Archive the instance's files (the runtime pauses it meanwhile)."""
        if len(display_name) > 200:
            raise invalid_argument("display_name must hold at most 200 characters")
        self.owned(tenant, instance_id)
        async with self._locks[instance_id]:
            rec = self.store.get(instance_id)
            assert rec is not None
            with _precondition():
                check_request(instance_id, rec.state, Request.SNAPSHOT)
            snapshot_id = "s-" + secrets.token_hex(6)
            self.snapshot_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            dest = self.snapshot_dir / f"{snapshot_id}.tar"
            try:
                result = await self.runtime.snapshot(rec.sandbox_id, dest)
            except Unsupported as err:
                message = f"instance {instance_id} cannot be snapshotted: {self._public(err)}"
                raise failed_precondition(message) from None
            except Exception as err:
                dest.unlink(missing_ok=True)
                message = f"the runtime could not snapshot {instance_id}: {self._public(err)}"
                raise RpcError(grpc.StatusCode.INTERNAL, message) from None
            snap = SnapshotRecord(
                id=snapshot_id,
                tenant=tenant,
                instance_id=instance_id,
                create_time_us=self.clock.now_us(),
                size_bytes=result.size_bytes,
                includes_memory=result.includes_memory,
                template=rec.template,
                display_name=display_name,
                path=str(result.path),
            )
            self.store.add_snapshot(snap)
            return snap

    def delete_snapshot(self, tenant: str, snapshot_id: str) -> None:
        """Delete a snapshot and its archive."""
        snap = self.owned_snapshot(tenant, snapshot_id)
        Path(snap.path).unlink(missing_ok=True)
        self.store.delete_snapshot(snapshot_id)
