"""The Kubernetes API as the kubevirt runtime and its record store use it: one client, counted.

The official synchronous `kubernetes` client, not kubernetes_asyncio: the record store has to
keep the `Store` interface the lifecycle calls without awaiting (SQLite's, instance_svc/store.py),
so its writes are blocking calls either way, and one client for the store and the runtime means
one connection pool, one configuration and one request counter. The runtime's waits never block
the event loop: they wait on the shared watch (watcher.py), whose stream runs on a thread of its
own, and the runtime's few blocking calls run in a small thread pool.

Configuration: `CYBERDESK_KUBECONFIG` or `KUBECONFIG` (the current context), else the in-cluster
service account; the namespace is `CYBERDESK_KUBE_NAMESPACE`, else the context's, else
`cyberdesk`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from cyberdesk_common.config import ConfigError, env_str
from instance_svc.operator import contract

T = TypeVar("T")
LEASE_GROUP = "coordination.k8s.io"

__all__ = ["ApiException", "Kube", "conflict", "gone", "load"]


def gone(err: BaseException) -> bool:
    """The object does not exist (404)."""
    return isinstance(err, ApiException) and err.status == 404


def conflict(err: BaseException) -> bool:
    """A write lost an optimistic-concurrency race, or the name is taken (409)."""
    return isinstance(err, ApiException) and err.status == 409


class _CountingClient(k8s.ApiClient):
    """An ApiClient that counts the HTTP requests it makes (the bench reports requests per lifecycle)."""

    def __init__(self, configuration: k8s.Configuration) -> None:
        super().__init__(configuration)
        self.requests = 0
        self._lock = threading.Lock()

    def call_api(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.requests += 1
        return super().call_api(*args, **kwargs)


class Kube:
    """Typed helpers over the API calls the runtime and the store make, in one namespace."""

    def __init__(self, configuration: k8s.Configuration, namespace: str) -> None:
        # Two replicas' creates, their watches and the runtime's thread pool share the pool.
        configuration.connection_pool_maxsize = 32
        self.api_client = _CountingClient(configuration)
        self.namespace = namespace
        self.custom = k8s.CustomObjectsApi(self.api_client)
        self.core = k8s.CoreV1Api(self.api_client)

    @property
    def requests(self) -> int:
        """HTTP requests made so far (watch streams count once, when opened)."""
        return self.api_client.requests

    def close(self) -> None:
        """Close the connection pool."""
        self.api_client.close()  # type: ignore[no-untyped-call]

    # --- our custom resources ----------------------------------------------------------------

    def get(self, plural: str, name: str) -> dict[str, Any]:
        """GET one object (ApiException 404 when absent)."""
        obj = cast(
            dict[str, Any],
            self.custom.get_namespaced_custom_object(contract.GROUP, contract.VERSION, self.namespace, plural, name),
        )
        return obj

    def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a new object (409 when the name is taken)."""
        obj = cast(
            dict[str, Any],
            self.custom.create_namespaced_custom_object(contract.GROUP, contract.VERSION, self.namespace, plural, body),
        )
        return obj

    def patch(self, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch; a `metadata.resourceVersion` in it makes it conditional (409 when stale)."""
        obj = cast(
            dict[str, Any],
            self.custom.patch_namespaced_custom_object(
                contract.GROUP, contract.VERSION, self.namespace, plural, name, patch
            ),
        )
        return obj

    def delete(self, plural: str, name: str) -> None:
        """DELETE (finalizers keep the object until they are removed); 404 is not an error."""
        try:
            self.custom.delete_namespaced_custom_object(contract.GROUP, contract.VERSION, self.namespace, plural, name)
        except ApiException as err:
            if err.status != 404:
                raise

    def list(self, plural: str, selector: str = "") -> tuple[list[dict[str, Any]], str]:
        """The objects matching a label selector and the list's resourceVersion."""
        reply = cast(
            dict[str, Any],
            self.custom.list_namespaced_custom_object(
                contract.GROUP, contract.VERSION, self.namespace, plural, label_selector=selector or None
            ),
        )
        items: list[dict[str, Any]] = reply.get("items") or []
        return items, str((reply.get("metadata") or {}).get("resourceVersion") or "")

    # --- Leases (coordination.k8s.io/v1: the same URL shape as a custom resource's) -------------

    def lease(self, name: str) -> dict[str, Any] | None:
        """GET a Lease; None when absent."""
        try:
            return cast(
                dict[str, Any],
                self.custom.get_namespaced_custom_object(LEASE_GROUP, "v1", self.namespace, "leases", name),
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def put_lease(self, name: str, spec: dict[str, Any]) -> None:
        """Create the Lease, or merge `spec` into the existing one."""
        body = {"apiVersion": f"{LEASE_GROUP}/v1", "kind": "Lease", "metadata": {"name": name}, "spec": spec}
        try:
            self.custom.create_namespaced_custom_object(LEASE_GROUP, "v1", self.namespace, "leases", body)
        except ApiException as err:
            if err.status != 409:
                raise
            self.custom.patch_namespaced_custom_object(
                LEASE_GROUP, "v1", self.namespace, "leases", name, {"spec": spec}
            )

    def delete_lease(self, name: str) -> None:
        """DELETE a Lease; 404 is not an error."""
        try:
            self.custom.delete_namespaced_custom_object(LEASE_GROUP, "v1", self.namespace, "leases", name)
        except ApiException as err:
            if err.status != 404:
                raise

    # --- built-ins ---------------------------------------------------------------------------

    def secret_data(self, name: str) -> dict[str, bytes]:
        """A Secret's data, decoded."""
        import base64

        secret = self.core.read_namespaced_secret(name, self.namespace)
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    def config_map(self, name: str) -> k8s.V1ConfigMap:
        """GET a ConfigMap."""
        return self.core.read_namespaced_config_map(name, self.namespace)

    def create_config_map(self, name: str, data: dict[str, str], labels: dict[str, str]) -> k8s.V1ConfigMap:
        """POST a ConfigMap (409 when it exists)."""
        body = k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=name, labels=labels), data=data)
        return self.core.create_namespaced_config_map(self.namespace, body)

    def replace_config_map(self, cm: k8s.V1ConfigMap) -> k8s.V1ConfigMap:
        """PUT a ConfigMap as read, changed: its resourceVersion makes it conditional (409 when stale)."""
        assert cm.metadata is not None and cm.metadata.name
        return self.core.replace_namespaced_config_map(cm.metadata.name, self.namespace, cm)


def _namespace_of_context(config_file: str | None) -> str:
    try:
        _contexts, active = k8s_config.list_kube_config_contexts(config_file=config_file)  # type: ignore[no-untyped-call]
    except Exception:
        return ""
    return str(((active or {}).get("context") or {}).get("namespace") or "")


def load() -> Kube:
    """A client for the cluster the settings name (see the module docstring)."""
    configuration = k8s.Configuration()
    config_file = env_str("KUBECONFIG", "") or os.environ.get("KUBECONFIG", "")
    namespace = env_str("KUBE_NAMESPACE", "")
    try:
        if config_file or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            path = config_file or os.path.expanduser("~/.kube/config")
            if not os.path.exists(path):
                raise ConfigError(
                    f"CYBERDESK_RUNTIME=kubevirt: no kubeconfig at {path}; set KUBECONFIG (or run inside a cluster)"
                )
            k8s_config.load_kube_config(config_file=path, client_configuration=configuration)  # type: ignore[no-untyped-call]
            namespace = namespace or _namespace_of_context(path)
        else:
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            ns_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
            if not namespace and os.path.exists(ns_file):
                with open(ns_file) as f:
                    namespace = f.read().strip()
    except k8s_config.ConfigException as err:
        raise ConfigError(f"CYBERDESK_RUNTIME=kubevirt: the Kubernetes configuration is unusable: {err}") from None
    return Kube(configuration, namespace or contract.DEFAULT_NAMESPACE)


def retry_conflicts(attempt: Callable[[], T], tries: int = 50) -> T:
    """Run `attempt` again while it loses optimistic-concurrency races (409); the last error otherwise."""
    for _ in range(tries - 1):
        try:
            return attempt()
        except ApiException as err:
            if err.status != 409:
                raise
    return attempt()
