"""The operator as a process (`python -m instance_svc.operator`): killed with -9 mid-reconcile, and two replicas.

The emulator and the KubeVirt stand-in are shared by the module; each test has a namespace of its own,
so the operators of one test never see the other's objects.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cyberdesk_stack import processes
from instance_svc.operator import contract
from kube_emulator.cluster import EmulatedCluster
from tests.k8s.operator.conftest import INSTANCES, POLICIES, SECRETS, TEMPLATES, VMS, instance_body, wait_for

CRASH_NS = "crash"
PEERS_NS = "peers"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, agent_port: int) -> Iterator[EmulatedCluster]:
    with EmulatedCluster(tmp_path_factory.mktemp("cluster"), namespaces=(CRASH_NS, PEERS_NS)) as c:
        for ns in (CRASH_NS, PEERS_NS):
            c.apply(
                TEMPLATES,
                {
                    "metadata": {"name": "base"},
                    "spec": {
                        "source": {"containerDisk": {"image": "ghcr.io/cyberdesk/guest:dev"}},
                        "agentPort": agent_port,
                    },
                },
                ns,
            )
        yield c


def start_operator(
    cluster: EmulatedCluster, workdir: Path, namespace: str, ident: str, **env: str
) -> subprocess.Popen[bytes]:
    return processes.spawn(
        [sys.executable, "-m", "instance_svc.operator"],
        {
            "KUBECONFIG": str(cluster.kubeconfig),
            "CYBERDESK_OPERATOR_NAMESPACE": namespace,
            "CYBERDESK_OPERATOR_ID": ident,
            "CYBERDESK_OPERATOR_RETRY_MAX": "0.5",
            **env,
        },
        workdir / f"{ident}.log",
    )


def phases(cluster: EmulatedCluster, namespace: str, names: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        obj = cluster.get(INSTANCES, name, namespace)
        out[name] = (obj or {}).get("status", {}).get("phase")
    return out


def test_killed_mid_reconcile_and_restarted_twice_over_makes_exactly_one_vm_per_instance(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    names = [f"i-crash-{n}" for n in range(6)]
    controller = cluster.controller
    assert controller is not None
    # The VMs stay in Scheduling until released: no instance gets past Starting before the kill.
    controller.held.update((CRASH_NS, n) for n in names)
    for name in names:
        cluster.apply(INSTANCES, instance_body(name), CRASH_NS)
    first = start_operator(cluster, tmp_path, CRASH_NS, "crash-1", CYBERDESK_OPERATOR_STANDALONE="1")
    creates: list[str | None] = []

    def kill_at_the_third_vm_create(verb: str, key: str, name: str | None) -> None:
        # Runs in the emulator as the request arrives: the operator dies with that create in flight
        # (the emulator still applies it, as a server that committed before its client died).
        if verb == "create" and key == VMS and first.poll() is None:
            creates.append(name)
            if len(creates) == 3:
                os.kill(first.pid, signal.SIGKILL)

    cluster.call(lambda em: em.request_hooks.append(kill_at_the_third_vm_create))
    try:
        first.wait(120)
    finally:
        if first.poll() is None:
            first.kill()
        cluster.call(lambda em: em.request_hooks.remove(kill_at_the_third_vm_create))
    assert first.returncode == -signal.SIGKILL
    at_kill = len(cluster.list(VMS, namespace=CRASH_NS))
    # Two restarted operators at once, both standalone (no peering): every event is handled twice,
    # concurrently, which the deterministic names must make harmless.
    second = start_operator(cluster, tmp_path, CRASH_NS, "crash-2", CYBERDESK_OPERATOR_STANDALONE="1")
    third = start_operator(cluster, tmp_path, CRASH_NS, "crash-3", CYBERDESK_OPERATOR_STANDALONE="1")
    try:
        wait_for(lambda: len(cluster.list(VMS, namespace=CRASH_NS)) == len(names), timeout=60, what="a VM per instance")

        def both_serving() -> bool:
            logs = [(tmp_path / f"crash-{n}.log").read_text() for n in (2, 3)]
            return all("Activity 'startup' succeeded" in log for log in logs)

        # Both are up before the VMs may run: both then race to dial, bind and write every status.
        wait_for(both_serving, timeout=60, what="both restarted operators serving")
        for name in names:
            cluster.call(lambda em, n=name: controller.release(CRASH_NS, n))
        wait_for(
            lambda: set(phases(cluster, CRASH_NS, names).values()) == {contract.PHASE_RUNNING},
            timeout=60,
            what=f"all Running ({phases(cluster, CRASH_NS, names)})",
        )
    finally:
        processes.stop(second)
        processes.stop(third)
    for name in names:
        selector = f"{contract.LABEL_INSTANCE}={name}"
        assert len(cluster.list(VMS, selector, CRASH_NS)) == 1, name
        assert len(cluster.list(SECRETS, selector, CRASH_NS)) == 1, name
        assert len(cluster.list(POLICIES, selector, CRASH_NS)) == 1, name
    assert len(cluster.list(VMS, namespace=CRASH_NS)) == len(names)
    # The first operator was killed with its third VM create in flight (some VMs may have been
    # in flight in parallel): the two after it finished the work without a duplicate.
    assert 3 <= at_kill <= len(names)


def test_two_replicas_with_peering_only_one_acts_and_the_other_takes_over(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    env = {"CYBERDESK_OPERATOR_PEERING_LIFETIME": "2", "CYBERDESK_OPERATOR_STANDALONE": "0"}
    high = start_operator(cluster, tmp_path, PEERS_NS, "replica-high", CYBERDESK_OPERATOR_PRIORITY="200", **env)
    low = start_operator(cluster, tmp_path, PEERS_NS, "replica-low", CYBERDESK_OPERATOR_PRIORITY="100", **env)
    try:
        peerings = f"{contract.PEERING_GROUP}/{contract.PEERING_VERSION}/{contract.PEERING_PLURAL}"

        def both_alive() -> bool:
            peering = cluster.get(peerings, contract.PEERING_NAME, PEERS_NS)
            return peering is not None and len(peering.get("status") or {}) == 2

        # kopf's peering is not a lock: the replicas settle who acts once both keep alive.
        wait_for(both_alive, timeout=60, what="both replicas in the peering object")
        names = [f"i-peer-{n}" for n in range(3)]
        for name in names:
            cluster.apply(INSTANCES, instance_body(name), PEERS_NS)
        wait_for(
            lambda: set(phases(cluster, PEERS_NS, names).values()) == {contract.PHASE_RUNNING},
            timeout=60,
            what="the replicas' instances Running",
        )
        writers = {
            vm["metadata"]["annotations"][contract.ANNOTATION_WRITTEN_BY]
            for vm in cluster.list(VMS, namespace=PEERS_NS)
        }
        assert writers == {"replica-high"}
        peering = cluster.get(
            f"{contract.PEERING_GROUP}/{contract.PEERING_VERSION}/{contract.PEERING_PLURAL}",
            contract.PEERING_NAME,
            PEERS_NS,
        )
        assert peering is not None and len(peering.get("status", {})) == 2  # both replicas keep alive
        # The active replica dies; once its keep-alive expires, the other one acts.
        high.send_signal(signal.SIGKILL)
        high.wait()
        cluster.apply(INSTANCES, instance_body("i-peer-after"), PEERS_NS)
        wait_for(
            lambda: phases(cluster, PEERS_NS, ["i-peer-after"])["i-peer-after"] == contract.PHASE_RUNNING,
            timeout=60,
            what="the standby replica to take over",
        )
        vm = cluster.get(VMS, "i-peer-after", PEERS_NS)
        assert vm is not None and vm["metadata"]["annotations"][contract.ANNOTATION_WRITTEN_BY] == "replica-low"
        # Before the takeover the standby wrote nothing: every earlier VM is the other replica's.
        low_log = (tmp_path / "replica-low.log").read_text()
        assert not any(f"VirtualMachine {name} written" in low_log for name in names)
    finally:
        for proc in (high, low):
            if proc.poll() is None:
                processes.stop(proc)
    assert os.path.exists(tmp_path / "replica-high.log")
