"""One emulated cluster (API emulator, KubeVirt stand-in, real guest agents on loopback TLS) per module."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest

from cyberdesk_stack import processes
from instance_svc.operator import contract
from kube_emulator.cluster import CYBERDESK_NS, EmulatedCluster

INSTANCES = f"{contract.GROUP}/{contract.VERSION}/{contract.INSTANCE_PLURAL}"
TEMPLATES = f"{contract.GROUP}/{contract.VERSION}/{contract.TEMPLATE_PLURAL}"
POOLS = f"{contract.GROUP}/{contract.VERSION}/{contract.WARM_POOL_PLURAL}"
SNAPSHOTS = f"{contract.GROUP}/{contract.VERSION}/{contract.SNAPSHOT_PLURAL}"
VMS = "kubevirt.io/v1/virtualmachines"
VMIS = "kubevirt.io/v1/virtualmachineinstances"
SECRETS = "/v1/secrets"
POLICIES = "networking.k8s.io/v1/networkpolicies"


def in_seconds(seconds: float) -> str:
    t = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (generous: the machine is shared and loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.03)


def instance_body(name: str, tenant: str = "t1", deadline: float = 600, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{contract.GROUP}/{contract.VERSION}",
        "kind": contract.INSTANCE_KIND,
        "metadata": {"name": name, "labels": {contract.LABEL_TENANT: tenant}},
        "spec": {
            "tenant": tenant,
            "template": "base",
            "resources": {"vcpu": 1, "memoryMiB": 512, "diskMiB": 2048},
            "deadline": in_seconds(deadline),
            **spec,
        },
    }


@pytest.fixture(scope="module")
def agent_port() -> int:
    return processes.free_port()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, agent_port: int) -> Iterator[EmulatedCluster]:
    with EmulatedCluster(tmp_path_factory.mktemp("cluster")) as c:
        c.apply(
            TEMPLATES,
            {
                "apiVersion": f"{contract.GROUP}/{contract.VERSION}",
                "kind": contract.TEMPLATE_KIND,
                "metadata": {"name": "base"},
                "spec": {
                    "source": {"containerDisk": {"image": "ghcr.io/cyberdesk/guest:dev"}},
                    "agentPort": agent_port,
                },
            },
        )
        yield c


@pytest.fixture(scope="module")
def kube(cluster: EmulatedCluster) -> kubernetes.client.ApiClient:
    """The real (sync) kubernetes client against the emulator, as instance_svc and kubectl would talk."""
    return kubernetes.config.new_client_from_config(str(cluster.kubeconfig))


@pytest.fixture(scope="module")
def custom(kube: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(kube)


NS = CYBERDESK_NS
