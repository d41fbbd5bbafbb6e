"""The whole stack on the kubevirt runtime, without a cluster: one per module.

* the Kubernetes API emulator (kube_emulator, real HTTP on loopback) with the CRDs of k8s/crds,
  the two templates and a warm pool of one VM;
* the KubeVirt stand-in (kube_emulator.virt_controller) whose VMs boot a real guest agent each
  (kube_emulator.guest.AgentGuests: TLS on a loopback address of its own, the token, certificate
  and key from the Secret the operator wrote);
* the instance operator (`python -m instance_svc.operator`), a process;
* `cyberdesk up --runtime kubevirt` (redis, instance_svc, billing_svc, gateway) with KUBECONFIG
  pointing at the emulator, and a second instance_svc replica sharing the cluster and Redis.
"""

from __future__ import annotations

import copy
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from cyberdesk_common.metadata import INTERNAL_TOKEN_METADATA, TENANT_METADATA
from cyberdesk_stack.processes import redis_password, spawn, stop, wait_healthy
from instance_svc.operator import contract
from kube_emulator.cluster import EmulatedCluster
from kube_emulator.emulator import Emulator
from kube_emulator.guest import AgentGuests
from tests.cli.stack import CLI
from tests.support.procs import free_port

NS = contract.DEFAULT_NAMESPACE
# The tenant whose quota the racing creates meet (CYBERDESK_QUOTA_OVERRIDES below).
RACE_TENANT = "race"
RACE_QUOTA = 10
# The tenant whose creates a replica killed in their middle leaves behind.
ORPHAN_TENANT = "orphan"
T = TypeVar("T")

INSTANCES = f"{contract.GROUP}/{contract.VERSION}/{contract.INSTANCE_PLURAL}"
SNAPSHOTS = f"{contract.GROUP}/{contract.VERSION}/{contract.SNAPSHOT_PLURAL}"
VMS = f"{contract.KUBEVIRT_GROUP}/{contract.KUBEVIRT_VERSION}/{contract.VM_PLURAL}"
SECRETS = "/v1/secrets"
CONFIGMAPS = "/v1/configmaps"


@dataclass
class Cluster:
    """The emulated cluster (kube_emulator.cluster.EmulatedCluster) and the operator on it."""

    emulated: EmulatedCluster
    agent_port: int
    operator: subprocess.Popen[bytes] | None = None
    operator_log: Path = field(default_factory=Path)

    @property
    def kubeconfig(self) -> Path:
        """The kubeconfig pointing at the emulator."""
        return self.emulated.kubeconfig

    def call(self, fn: Callable[[Emulator], T]) -> T:
        """Run `fn(emulator)` on the emulator's loop."""
        return self.emulated.call(fn)

    def get(self, key: str, name: str) -> dict[str, Any] | None:
        """An object of the emulator's store, copied (None when absent)."""
        return self.call(lambda em: copy.deepcopy(em.get_object(key, name, NS)))

    def objects(self, key: str) -> list[dict[str, Any]]:
        """Every object of a resource in the namespace, copied."""
        return self.call(lambda em: copy.deepcopy(em.list_objects(key, NS)))


def _templates(agent_port: int) -> list[dict[str, Any]]:
    """The templates instance_svc offers and a warm pool of one "base" VM of instance_svc's default shape.

    As the deploy's (k8s/), with an agent port of this run's own: another run of these tests (or
    the operator's) may use the default one on the same loopback addresses.
    """
    meta = {"namespace": NS, "labels": {contract.LABEL_PART_OF: contract.APP_NAME}}

    def template(name: str, desktop: bool, disk: int) -> dict[str, Any]:
        return {
            "apiVersion": contract.API_VERSION,
            "kind": contract.TEMPLATE_KIND,
            "metadata": {"name": name, **meta},
            "spec": {
                "source": {"containerDisk": {"image": f"ghcr.io/cyberdesk/guest-{name}:test"}},
                "agentPort": agent_port,
                "desktop": desktop,
                "defaults": {"vcpu": 1, "memoryMiB": 512, "diskMiB": disk},
            },
        }

    pool = {
        "apiVersion": contract.API_VERSION,
        "kind": contract.WARM_POOL_KIND,
        "metadata": {"name": "base", **meta},
        "spec": {"template": "base", "size": 1, "resources": {"vcpu": 1, "memoryMiB": 512, "diskMiB": 2048}},
    }
    return [template("base", False, 2048), template("desktop", True, 4096), pool]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("cluster")
    emulated = EmulatedCluster(work, namespaces=[NS])
    # Guests on 127.78/16 (kube_emulator's own tests use 127.77/16), per run a /24 of their own.
    emulated.guests = AgentGuests(work / "guests", first=f"127.78.{os.getpid() % 200 + 1}.2")
    agent_port = free_port()
    with emulated:
        for doc in _templates(agent_port):
            plural = contract.TEMPLATE_PLURAL if doc["kind"] == contract.TEMPLATE_KIND else contract.WARM_POOL_PLURAL
            emulated.apply(f"{contract.GROUP}/{contract.VERSION}/{plural}", doc)
        log = work / "operator.log"
        env = {"KUBECONFIG": str(emulated.kubeconfig), "CYBERDESK_OPERATOR_NAMESPACE": NS}
        operator = spawn([sys.executable, "-m", "instance_svc.operator"], env, log)
        try:
            yield Cluster(emulated, agent_port, operator, log)
        finally:
            stop(operator, timeout=15)


@dataclass
class Replica:
    """A second instance_svc on the same cluster and Redis."""

    proc: subprocess.Popen[bytes]
    target: str
    log: Path
    env: dict[str, str]


@dataclass
class Stack:
    """`cyberdesk up --runtime kubevirt` and what a client needs of it."""

    cluster: Cluster
    proc: subprocess.Popen[bytes]
    state: Path
    gateway: str
    instance_addr: str
    api_key: str
    internal_token: str
    output: bytearray
    config: Path
    replica: Replica | None = None

    def client(self) -> Any:
        from cyberdesk import Cyberdesk

        return Cyberdesk(api_key=self.api_key, endpoint=self.gateway, timeout=60)

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """`cyberdesk ARGS` with the config file `up` wrote (never raises on a non-zero exit)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CYBERDESK_")}
        env["CYBERDESK_CONFIG"] = str(self.config)
        return subprocess.run([CLI, *args], env=env, capture_output=True, timeout=120)

    def log(self, name: str) -> str:
        path = self.state / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def restart_replica(self, kill: bool = True) -> None:
        """kill -9 the second replica (unless it is dead already), then start it again on the same address."""
        assert self.replica is not None
        if kill:
            self.replica.proc.kill()
        self.replica.proc.wait()
        self.replica.proc = spawn([sys.executable, "-m", "instance_svc"], self.replica.env, self.replica.log)
        wait_healthy(self.replica.target, timeout=60, proc=self.replica.proc)

    def metadata(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return ((INTERNAL_TOKEN_METADATA, self.internal_token), (TENANT_METADATA, tenant))


def _stack_env(cluster: Cluster, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYBERDESK_") and k != "REDIS_URL"}
    env.update(
        {
            "CYBERDESK_CONFIG": str(tmp / "config.json"),
            "KUBECONFIG": str(cluster.kubeconfig),
            "CYBERDESK_KUBE_NAMESPACE": NS,
            "CYBERDESK_KUBE_WARM_POOLS": "base=base",
            "CYBERDESK_KUBE_READY_TIMEOUT": "60",
            "CYBERDESK_KUBE_CHANGE_TIMEOUT": "30",
            # Short enough that the module sees an ended instance's resource go, long enough that
            # every test reads its own TERMINATED records first.
            "CYBERDESK_KUBE_RECORD_RETENTION": "20",
            "CYBERDESK_KUBE_GC_INTERVAL": "1",
            # A replica killed with -9 is known dead 3 s after its last renewal.
            "CYBERDESK_KUBE_REPLICA_LEASE": "3",
            "CYBERDESK_QUOTA_OVERRIDES": f"{RACE_TENANT}:instances={RACE_QUOTA},vcpus=1000,memory_mib=1000000,"
            f"disk_mib=10000000;{ORPHAN_TENANT}:instances=3",
            "CYBERDESK_LOG_LEVEL": "INFO",
        }
    )
    return env


@pytest.fixture(scope="module")
def stack(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    state = tmp / "state"
    env = _stack_env(cluster, tmp)
    gateway, instance_addr, redis_port = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", free_port()
    argv = [
        CLI, "up", "--runtime", "kubevirt",
        "--state-dir", str(state),
        "--gateway-addr", gateway,
        "--http-addr", f"127.0.0.1:{free_port()}",
        "--instance-addr", instance_addr,
        "--billing-addr", f"127.0.0.1:{free_port()}",
        "--redis-port", str(redis_port),
        "--on-exit", "keep",
    ]  # fmt: skip
    # The secrets both replicas share are made first, so the second replica starts beside `up`
    # instead of after it (each service takes seconds to start on a loaded machine).
    state.mkdir(mode=0o700)
    token = "internal-" + secrets.token_urlsafe(30)
    password = redis_password(state / "redis_password")
    env["CYBERDESK_INTERNAL_TOKEN"] = token
    target = f"127.0.0.1:{free_port()}"
    (tmp / "replica").mkdir()
    replica_env = {
        **env,
        "CYBERDESK_STATE_DIR": str(tmp / "replica"),
        "CYBERDESK_INSTANCE_ADDR": target,
        "CYBERDESK_RUNTIME": "kubevirt",
        "REDIS_URL": f"redis://:{password}@127.0.0.1:{redis_port}/0",
    }
    log = tmp / "replica.log"
    replica = Replica(spawn([sys.executable, "-m", "instance_svc"], replica_env, log), target, log, replica_env)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = bytearray()
    try:
        deadline = time.monotonic() + 100
        while b"Try: cyberdesk create" not in output:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cyberdesk up did not start:\n{output.decode(errors='replace')}")
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                output += os.read(proc.stdout.fileno(), 65536)
        wait_healthy(target, timeout=60, proc=replica.proc)
        key = (state / "dev_api_key").read_text().strip()
        yield Stack(cluster, proc, state, gateway, instance_addr, key, token, output, tmp / "config.json", replica)
    finally:
        stop(replica.proc, timeout=20)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def channel(target: str) -> grpc.Channel:
    """A plain channel to an instance_svc replica (loopback)."""
    return grpc.insecure_channel(target)
