"""The kubevirt runtime: instances as KubeVirt VMs, through CyberdeskInstance resources and the operator.

instance_svc writes what it wants into the cluster and the instance operator
(instance_svc/operator) makes it happen; the two meet only at the resources whose contract is
instance_svc/operator/contract.py (and docs/kubernetes.md, "Contract"). Several instance_svc
replicas share everything through the API server: the resources are the records.

| module | where ... |
| --- | --- |
| `kube.py` | the cluster is reached: the kubeconfig (or the service account), the namespace, requests counted |
| `watcher.py` | one watch per replica keeps a cache of every instance; waits and exit reports hang on it |
| `records.py` | a record becomes a resource and back (spec for the operator, annotations for instance_svc) |
| `store.py` | `KubeStore`: the records, the event outbox, the per-tenant quota (a ConfigMap, optimistic concurrency) |
| `runtime.py` | `KubevirtRuntime`: the `Runtime` contract (create, delete, pause, resume, snapshot, watch) |

Settings (read here): CYBERDESK_KUBECONFIG or KUBECONFIG, CYBERDESK_KUBE_NAMESPACE,
CYBERDESK_KUBE_READY_TIMEOUT (s, 600), CYBERDESK_KUBE_CHANGE_TIMEOUT (s, 120),
CYBERDESK_KUBE_SNAPSHOT_TIMEOUT (s, 600), CYBERDESK_KUBE_WARM_POOLS ("base=<CyberdeskWarmPool
name>,desktop=..."), CYBERDESK_KUBE_RECORD_RETENTION (s, 3600: how long an ended instance's
resource stays as its record), CYBERDESK_KUBE_GC_INTERVAL (s, 600), CYBERDESK_KUBE_REPLICA_LEASE (s,
15: a replica's Lease; a create of a replica whose Lease lapsed is ended by another).
"""

from __future__ import annotations

from cyberdesk_common.config import ConfigError, env_int, env_str
from instance_svc.runtime.base import Runtime
from instance_svc.runtime.kubevirt.kube import Kube, load
from instance_svc.runtime.kubevirt.runtime import KubevirtOptions, KubevirtRuntime
from instance_svc.runtime.kubevirt.store import KubeStore
from instance_svc.validation import TEMPLATES

__all__ = ["Kube", "KubeStore", "KubevirtOptions", "KubevirtRuntime", "from_env", "store_for"]


def parse_warm_pools(text: str) -> tuple[tuple[str, str], ...]:
    """CYBERDESK_KUBE_WARM_POOLS, e.g. "base=cyberdesk-base"."""
    pools = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        template, _, pool = item.partition("=")
        if template not in TEMPLATES or not pool:
            raise ConfigError(
                f"CYBERDESK_KUBE_WARM_POOLS: {item!r} is not template=pool with template one of {TEMPLATES}"
            )
        pools.append((template, pool))
    return tuple(pools)


def from_env() -> KubevirtRuntime:
    """The runtime for the cluster of the current kubeconfig (or the pod's service account)."""
    options = KubevirtOptions(
        ready_timeout_s=float(env_int("KUBE_READY_TIMEOUT", 600, minimum=1)),
        change_timeout_s=float(env_int("KUBE_CHANGE_TIMEOUT", 120, minimum=1)),
        snapshot_timeout_s=float(env_int("KUBE_SNAPSHOT_TIMEOUT", 600, minimum=1)),
        warm_pools=parse_warm_pools(env_str("KUBE_WARM_POOLS", "")),
        record_retention_s=float(env_int("KUBE_RECORD_RETENTION", 3600, minimum=1)),
        gc_interval_s=float(env_int("KUBE_GC_INTERVAL", 600, minimum=1)),
        lease_s=float(env_int("KUBE_REPLICA_LEASE", 15, minimum=1)),
    )
    return KubevirtRuntime(load(), options)


def store_for(runtime: Runtime) -> KubeStore:
    """The record store sharing the runtime's client and watch."""
    assert isinstance(runtime, KubevirtRuntime)
    return KubeStore(runtime.kube, runtime.watcher, dict(runtime.options.warm_pools), runtime.replica_id)
