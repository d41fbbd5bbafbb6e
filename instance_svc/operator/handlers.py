"""kopf's view of the operator: indexes of VMs and VMIs, wake-ups on events, one daemon per object.

Importing this module registers the handlers in kopf's default registry; `instance_svc.operator.app`
runs them. The daemons are the reconcilers (instances.py, pools.py, snapshots.py); everything
else only keeps the indexes they read and wakes them when something they care about changed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from instance_svc.operator import contract
from instance_svc.operator.instances import Reconciler
from instance_svc.operator.kube import Kube, KubeError
from instance_svc.operator.pools import PoolReconciler
from instance_svc.operator.snapshots import SnapshotReconciler
from instance_svc.operator.state import INSTANCE, POOL, SNAPSHOT, OperatorState, Settings

log = logging.getLogger("instance_svc.operator")

KV = (contract.KUBEVIRT_GROUP, contract.KUBEVIRT_VERSION)
INSTANCES = (contract.GROUP, contract.VERSION, contract.INSTANCE_PLURAL)
POOLS = (contract.GROUP, contract.VERSION, contract.WARM_POOL_PLURAL)
SNAPSHOTS = (contract.GROUP, contract.VERSION, contract.SNAPSHOT_PLURAL)
MANAGED = {contract.LABEL_MANAGED_BY: contract.MANAGED_BY}
# Where a kopf annotation would otherwise say "kopf.zalando.org".
PREFIX = "operator.cyberdesk.io"


def _state(memo: Any) -> OperatorState:
    state: OperatorState = memo.state
    return state


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod, its service account; elsewhere $KUBECONFIG (or ~/.kube/config)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = contract.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX)
    # Kubernetes Events only for warnings: an Event per handler run would double the API writes.
    settings.posting.level = logging.WARNING
    # A deleted object's daemon is asked to stop; it is woken at once, so it need not be polled long.
    settings.background.cancellation_polling = 0.2
    settings.watching.server_timeout = 300
    # No cluster-wide watches of Namespaces and CRDs: the operator serves one namespace and its
    # CRDs are applied before it starts, so a namespaced Role is all it needs (k8s/base/rbac.yaml).
    settings.scanning.disabled = True
    if not hasattr(memo, "state"):
        memo.state = OperatorState(await Kube.connect(), Settings.from_env())


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if hasattr(memo, "state"):
        await _state(memo).kube.close()


# -- indexes (kopf fills them from its watches before any daemon starts) ---------------------------
# Every handler below is async although it does not await: kopf runs a sync handler in a thread
# pool, and a hop to a thread per watch event cost more than half of the operator's CPU in a burst.


@kopf.index(*KV, contract.VM_PLURAL, labels=MANAGED)
async def vms(namespace: str | None, name: str, meta: kopf.Meta, **_: Any) -> dict[Any, Any]:
    annotations = meta.get("annotations") or {}
    return {
        (namespace, name): {
            "uid": meta["uid"],
            "rv": meta.get("resourceVersion", ""),
            "instance_uid": annotations.get(contract.ANNOTATION_INSTANCE_UID, ""),
            "deleting": bool(meta.get("deletionTimestamp")),
        }
    }


@kopf.index(*KV, contract.VM_PLURAL, labels=MANAGED)
async def vm_owners(name: str, meta: kopf.Meta, **_: Any) -> dict[Any, Any] | None:
    uid = (meta.get("annotations") or {}).get(contract.ANNOTATION_INSTANCE_UID)
    return {uid: name} if uid else None


@kopf.index(*KV, contract.VM_PLURAL, labels={contract.LABEL_POOL: kopf.PRESENT})
async def pool_members(
    namespace: str | None, name: str, meta: kopf.Meta, labels: kopf.Labels, **_: Any
) -> dict[Any, Any]:
    return {
        (namespace, labels[contract.LABEL_POOL]): {
            "name": name,
            "rv": meta.get("resourceVersion", ""),
            "state": labels.get(contract.LABEL_POOL_STATE, contract.POOL_STATE_STARTING),
            "deleting": bool(meta.get("deletionTimestamp")),
        }
    }


@kopf.index(*KV, contract.VMI_PLURAL, labels={contract.LABEL_VM: kopf.PRESENT})
async def vmis(namespace: str | None, name: str, meta: kopf.Meta, status: kopf.Status, **_: Any) -> dict[Any, Any]:
    interfaces = status.get("interfaces") or []
    conditions = status.get("conditions") or []
    return {
        (namespace, name): {
            "uid": meta["uid"],
            "phase": status.get("phase"),
            "ip": (interfaces[0].get("ipAddress") if interfaces else None) or None,
            "paused": any(c.get("type") == "Paused" and c.get("status") == "True" for c in conditions),
            "deleting": bool(meta.get("deletionTimestamp")),
            "reason": status.get("reason", ""),
        }
    }


# -- wake-ups --------------------------------------------------------------------------------------


@kopf.on.event(*INSTANCES)
async def instance_event(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    _state(memo).wake(INSTANCE, namespace, name)


@kopf.on.event(*POOLS)
async def pool_event(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    _state(memo).wake(POOL, namespace, name)


@kopf.on.event(*SNAPSHOTS)
async def snapshot_event(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    _state(memo).wake(SNAPSHOT, namespace, name)


def _wake_for_vm(state: OperatorState, ns: str | None, name: str, labels: Any, annotations: Any) -> None:
    namespace = ns or ""
    if labels.get(contract.LABEL_INSTANCE):
        state.wake(INSTANCE, namespace, labels[contract.LABEL_INSTANCE])
    pool = labels.get(contract.LABEL_POOL) or state.member_pools.pop((namespace, name), None)
    if pool:
        if labels.get(contract.LABEL_POOL):
            state.member_pools[(namespace, name)] = pool
        state.wake(POOL, namespace, pool)
    owner = state.vm_instances.get((namespace, name))
    if owner:
        state.wake(INSTANCE, namespace, owner)


@kopf.on.event(*KV, contract.VM_PLURAL, labels=MANAGED)
async def vm_event(
    namespace: str | None, name: str, labels: kopf.Labels, annotations: kopf.Annotations, memo: kopf.Memo, **_: Any
) -> None:
    _wake_for_vm(_state(memo), namespace, name, labels, annotations)


@kopf.on.event(*KV, contract.VMI_PLURAL, labels={contract.LABEL_VM: kopf.PRESENT})
async def vmi_event(
    namespace: str | None, name: str, labels: kopf.Labels, annotations: kopf.Annotations, memo: kopf.Memo, **_: Any
) -> None:
    _wake_for_vm(_state(memo), namespace, name, labels, annotations)


@kopf.on.event(contract.SNAPSHOT_GROUP, contract.SNAPSHOT_VERSION, contract.VM_SNAPSHOT_PLURAL, labels=MANAGED)
async def vm_snapshot_event(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    if labels.get(contract.LABEL_SNAPSHOT):
        _state(memo).wake(SNAPSHOT, namespace, labels[contract.LABEL_SNAPSHOT])


@kopf.on.event(contract.SNAPSHOT_GROUP, contract.SNAPSHOT_VERSION, contract.VM_RESTORE_PLURAL, labels=MANAGED)
async def vm_restore_event(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    if labels.get(contract.LABEL_INSTANCE):
        _state(memo).wake(INSTANCE, namespace, labels[contract.LABEL_INSTANCE])


# -- the reconcilers -------------------------------------------------------------------------------


async def _loop(
    kind: str,
    stopped: kopf.DaemonStopped,
    state: OperatorState,
    namespace: str | None,
    name: str,
    step: Any,
    backoff: Any,
    logger: Any,
) -> None:
    state.waker(kind, namespace, name)

    async def wake_when_stopped() -> None:
        # kopf raises `stopped` on deletion or shutdown; the reconciler sleeps on its own event.
        await stopped.wait()
        state.wake(kind, namespace, name)

    bridge = asyncio.ensure_future(wake_when_stopped())
    try:
        while not stopped:
            try:
                delay = await step()
            except KubeError as e:
                logger.warning("%s %s: API error, retrying: %s", kind, name, e)
                delay = backoff()
            except Exception:
                logger.exception("%s %s: reconcile failed, retrying", kind, name)
                delay = backoff()
            if stopped:
                break
            await state.sleep(kind, namespace, name, delay)
    finally:
        bridge.cancel()
        state.forget(kind, namespace, name)


@kopf.daemon(*INSTANCES, id="instance", cancellation_timeout=5.0)
async def instance_daemon(
    stopped: kopf.DaemonStopped,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    logger: Any,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    vms, vmis, vm_owners, pool_members = (kwargs[k] for k in ("vms", "vmis", "vm_owners", "pool_members"))
    state = _state(memo)
    rec = Reconciler(state, namespace or "", name, log)

    async def step() -> float | None:
        view = rec.view(body, vms, vmis, vm_owners, pool_members)
        delay = await rec.reconcile(view)
        vm_name = view.status.get("vmName")
        if vm_name:
            state.vm_instances[(namespace or "", str(vm_name))] = name
        return delay

    await _loop(INSTANCE, stopped, state, namespace, name, step, rec._backoff, log)


@kopf.on.delete(*INSTANCES, id="finalize")
async def instance_deleted(
    namespace: str | None,
    name: str,
    body: kopf.Body,
    logger: Any,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    vms, vmis, vm_owners, pool_members = (kwargs[k] for k in ("vms", "vmis", "vm_owners", "pool_members"))
    """The finalizer: the VM, its Secret and NetworkPolicy go first, then the instance may."""
    state = _state(memo)
    rec = Reconciler(state, namespace or "", name, log)
    for _attempt in range(40):
        if await rec.finalize(rec.view(body, vms, vmis, vm_owners, pool_members)):
            for key, value in list(state.vm_instances.items()):
                if value == name and key[0] == namespace:
                    del state.vm_instances[key]
            log.info("instance %s: VM removed", name)
            return
        await state.sleep(INSTANCE, namespace, name, 0.5)
    raise kopf.TemporaryError("the VirtualMachine is still being removed", delay=1.0)


@kopf.daemon(*POOLS, id="pool", cancellation_timeout=5.0)
async def pool_daemon(
    stopped: kopf.DaemonStopped,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    logger: Any,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    pool_members, vmis = kwargs["pool_members"], kwargs["vmis"]
    state = _state(memo)
    rec = PoolReconciler(state, namespace or "", name, log)

    async def step() -> float | None:
        return await rec.reconcile(body, pool_members, vmis)

    state.pools[(namespace or "", name)] = body
    try:
        await _loop(POOL, stopped, state, namespace, name, step, rec._backoff, log)
    finally:
        state.pools.pop((namespace or "", name), None)


@kopf.daemon(*SNAPSHOTS, id="snapshot", cancellation_timeout=5.0)
async def snapshot_daemon(
    stopped: kopf.DaemonStopped,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    logger: Any,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    state = _state(memo)
    rec = SnapshotReconciler(state, namespace or "", name, log)

    async def step() -> float | None:
        return await rec.reconcile(body)

    await _loop(SNAPSHOT, stopped, state, namespace, name, step, lambda: state.settings.retry_max, log)
