"""instance_svc on the kubevirt runtime: how long its parts take, and how many API requests an instance costs.

Against the Kubernetes API emulator (kube_emulator, real HTTP on loopback), the real instance
operator (`python -m instance_svc.operator`, a process) and the KubeVirt stand-in, whose VMs boot
a real guest agent each (TLS on loopback). instance_svc's lifecycle runs in this process with the
kubevirt runtime and its record store (instance_svc/runtime/kubevirt), exactly as `python -m
instance_svc` wires them, minus the gRPC server, so that its own API requests can be counted
(`Kube.requests`) apart from the operator's (the emulator counts everybody's).

One sample is one instance's whole life, one at a time: create (RUNNING), then delete
(TERMINATED). Times are of this process's clock; the emulator runs in it (a thread), so the
moment the VirtualMachine is written and the moment the stand-in moves the VMI to Running are
seen on the same clock:

* create -> VM written: CreateInstance until the operator's VirtualMachine exists;
* VMI Running -> RUNNING: the simulated boot's end until the lifecycle returns the instance
  RUNNING (the operator dials the agent and writes the status, instance_svc sees it on its watch,
  reads the Secret and binds the agent);
* status Running -> RUNNING: instance_svc's own part of that;
* requests per lifecycle: instance_svc's (create, delete) and everybody's (the emulator's count:
  instance_svc and the operator; the KubeVirt stand-in writes in-process, uncounted, where a real
  KubeVirt's own requests would add to it);
* the size of a Running CyberdeskInstance (what each replica's watch cache holds per instance).

`BENCH_N` samples (default 10).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._k8s import Moments
from bench._report import latency_summary, report
from cyberdesk_stack.processes import free_port, redis_server, spawn, stop
from instance_svc.events import Publisher
from instance_svc.expiry import TimeoutAction
from instance_svc.lifecycle import Lifecycle
from instance_svc.operator import contract
from instance_svc.pool import WarmPool
from instance_svc.quotas import Limits, QuotaTable
from instance_svc.runtime.kubevirt import KubeStore, KubevirtOptions, KubevirtRuntime, kube
from instance_svc.validation import CreateSpec
from kube_emulator.cluster import EmulatedCluster
from kube_emulator.guest import AgentGuests

N = int(os.environ.get("BENCH_N", "10"))
NS = contract.DEFAULT_NAMESPACE


def _template(agent_port: int) -> dict[str, Any]:
    return {
        "apiVersion": contract.API_VERSION,
        "kind": contract.TEMPLATE_KIND,
        "metadata": {"name": "base", "namespace": NS},
        "spec": {
            "source": {"containerDisk": {"image": "ghcr.io/cyberdesk/guest-base:bench"}},
            "agentPort": agent_port,
            "desktop": False,
            "defaults": {"vcpu": 1, "memoryMiB": 512, "diskMiB": 2048},
        },
    }


async def _samples(lifecycle: Lifecycle, k: kube.Kube, api: EmulatedCluster, moments: Moments) -> list[dict[str, Any]]:
    await lifecycle.start()
    out = []
    spec = CreateSpec(
        template="base", vcpus=1, memory_mib=256, timeout_us=600_000_000, timeout_action=TimeoutAction.TERMINATE
    )
    for _ in range(N + 1):  # the first warms up (connections, imports) and is not counted
        before, before_all = k.requests, api.call(lambda em: em.stats()["total"])
        start = time.perf_counter()
        rec = await lifecycle.create("bench", spec)
        done = time.perf_counter()
        if rec.state.name != "RUNNING":
            raise RuntimeError(f"create failed: {rec.state_message}")
        created_requests = k.requests - before
        await lifecycle.delete("bench", rec.id)
        vm = rec.sandbox_id
        out.append(
            {
                "create_to_vm_ms": (moments.vm_written[vm] - start) * 1000,
                "vmi_running_to_running_ms": (done - moments.vmi_running[vm]) * 1000,
                "status_running_to_running_ms": (done - moments.status_running[rec.id]) * 1000,
                "create_ms": (done - start) * 1000,
                "instance_svc_create_requests": created_requests,
                "instance_svc_lifecycle_requests": k.requests - before,
                "all_lifecycle_requests": api.call(lambda em: em.stats()["total"]) - before_all,
            }
        )
    return out[1:]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-k8s-") as tmp_s:
        tmp = Path(tmp_s)
        emulated = EmulatedCluster(tmp, namespaces=[NS])
        emulated.guests = AgentGuests(tmp / "guests", first="127.79.0.2")  # not the tests' addresses
        moments = Moments()
        with emulated, redis_server(tmp) as redis_url:
            templates = f"{contract.GROUP}/{contract.VERSION}/{contract.TEMPLATE_PLURAL}"
            emulated.apply(templates, _template(free_port()))
            emulated.call(moments.install)
            env = {"KUBECONFIG": str(emulated.kubeconfig), "CYBERDESK_OPERATOR_NAMESPACE": NS}
            operator: subprocess.Popen[bytes] = spawn(
                [sys.executable, "-m", "instance_svc.operator"], env, tmp / "operator.log"
            )
            os.environ["KUBECONFIG"] = str(emulated.kubeconfig)
            try:
                k = kube.load()
                runtime = KubevirtRuntime(k, KubevirtOptions(ready_timeout_s=60, change_timeout_s=30))
                store = KubeStore(k, runtime.watcher)
                lifecycle = Lifecycle(
                    store=store,
                    runtime=runtime,
                    quotas=QuotaTable(Limits(instances=100, vcpus=100, memory_mib=100_000, disk_mib=1_000_000)),
                    publisher=Publisher(store, redis_url),
                    pool=WarmPool(runtime, {}),
                    snapshot_dir=tmp / "snapshots",
                )

                async def run() -> list[dict[str, Any]]:
                    try:
                        return await _samples(lifecycle, k, emulated, moments)
                    finally:
                        await lifecycle.stop()

                samples = asyncio.run(run())
            finally:
                stop(operator)
    rows = []
    for key in ("create_to_vm_ms", "vmi_running_to_running_ms", "status_running_to_running_ms", "create_ms"):
        rows.append(
            {"measure": key.removesuffix("_ms").replace("_", " "), **latency_summary([s[key] for s in samples])}
        )
    requests = {
        key: sorted(s[key] for s in samples)[len(samples) // 2]
        for key in ("instance_svc_create_requests", "instance_svc_lifecycle_requests", "all_lifecycle_requests")
    }
    sizes = sorted(moments.object_bytes.values())
    report(
        "k8s_lifecycle",
        rows,
        requests_per_lifecycle_median=requests,
        instance_object_bytes_median=sizes[len(sizes) // 2],
        n=len(samples),
    )


if __name__ == "__main__":
    main()
