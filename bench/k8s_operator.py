"""The instance operator alone: API requests per instance, reconcile throughput, its latencies, warm claims.

Against the Kubernetes API emulator (kube_emulator, real HTTP on loopback, counting every request)
and the KubeVirt stand-in (which writes through the emulator's store, so its own work is not in
the counts: a real virt-controller's requests are KubeVirt's, not ours). The operator is the real
one as a process (`python -m instance_svc.operator`). CyberdeskInstances are written into the store
directly, so every request counted is the operator's.

Inside each VM runs a small in-process gRPC agent (AgentService with the VM's TLS certificate and
token from its Secret, on a loopback address of its own) instead of a full `python -m guest_agent`
per VM, so that a burst of a few hundred VMs measures the operator, not this machine's process
starts. (tests/k8s/operator boot the real agent from the same Secret.)

Measured:
* lifecycle (one at a time, BENCH_N, default 20): CR written -> VirtualMachine written; VMI Running
  -> status Running with agentEndpoint; the operator's requests from create to the CR gone, by verb;
* burst (BENCH_BURST instances at once, default 200): time until all VMs are written and all are
  Running, i.e. reconciles per second, and the requests per instance;
* idle: requests the operator makes in BENCH_IDLE_S seconds (default 10) with the burst's instances
  all Running: what standing instances cost the API server (no periodic sweep);
* warm pool: CR written (naming a pool of ready VMs) -> Running.
"""

from __future__ import annotations

import base64
import collections
import datetime
import ipaddress
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench._k8s import INSTANCES, VMIS, VMS, Moments
from bench._report import latency_summary, report
from cyberdesk_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from cyberdesk_stack.processes import free_port, spawn, stop
from instance_svc.operator import contract
from kube_emulator import EmulatorThread
from kube_emulator.virt_controller import VirtController

N = int(os.environ.get("BENCH_N", "20"))
BURST = int(os.environ.get("BENCH_BURST", "200"))
IDLE_S = float(os.environ.get("BENCH_IDLE_S", "10"))
NS = contract.DEFAULT_NAMESPACE
G = f"{contract.GROUP}/{contract.VERSION}"
RESOURCES = {"vcpu": 1, "memoryMiB": 512, "diskMiB": 2048}


class _Agent(agent_pb2_grpc.AgentServiceServicer):
    """GetAgentInfo and ConfigureAgent behind the VM's token, as the guest agent answers them."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}"
        self.instance_id = ""

    async def _check(self, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        if dict(context.invocation_metadata() or ()).get("authorization") != self.expected:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")

    async def GetAgentInfo(self, request: Any, context: Any) -> agent_pb2.GetAgentInfoResponse:
        await self._check(context)
        return agent_pb2.GetAgentInfoResponse(instance_id=self.instance_id)

    async def ConfigureAgent(self, request: Any, context: Any) -> agent_pb2.ConfigureAgentResponse:
        await self._check(context)
        self.instance_id = request.instance_id
        return agent_pb2.ConfigureAgentResponse()


class StubGuests:
    """A Guest for the stand-in: per VM an in-process TLS gRPC AgentService from the VM's Secret."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._next = ipaddress.ip_address("127.78.0.2")
        self.servers: dict[tuple[str, str], grpc.aio.Server] = {}

    async def boot(self, vmi: dict[str, Any], secret: dict[str, Any] | None, restored_from: str | None) -> str:
        address = str(self._next)
        self._next += 1
        if secret is None:
            return address
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        server = grpc.aio.server()
        agent_pb2_grpc.add_AgentServiceServicer_to_server(_Agent(data[contract.SECRET_KEY_TOKEN].decode()), server)
        creds = grpc.ssl_server_credentials([(data[contract.SECRET_KEY_TLS_KEY], data[contract.SECRET_KEY_TLS_CERT])])
        server.add_secure_port(f"{address}:{self.port}", creds)
        await server.start()
        self.servers[(vmi["metadata"]["namespace"], vmi["metadata"]["name"])] = server
        return address

    async def shutdown(self, namespace: str, name: str) -> None:
        server = self.servers.pop((namespace, name), None)
        if server is not None:
            await server.stop(0)

    async def pause(self, namespace: str, name: str) -> None:
        return None

    async def unpause(self, namespace: str, name: str) -> None:
        return None

    async def snapshot(self, namespace: str, name: str, content: str) -> int:
        return 0

    async def close(self) -> None:
        for ns, name in list(self.servers):
            await self.shutdown(ns, name)


def _deadline(seconds: float) -> str:
    t = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _instance(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": G,
        "kind": contract.INSTANCE_KIND,
        "metadata": {"name": name, "namespace": NS, "labels": {contract.LABEL_TENANT: "bench"}},
        "spec": {"tenant": "bench", "template": "base", "resources": RESOURCES, "deadline": _deadline(3600), **spec},
    }


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.002)


def _by_verb(stats: dict[str, Any], since: dict[str, Any]) -> dict[str, int]:
    out: collections.Counter[str] = collections.Counter()
    for key, n in stats["by_resource"].items():
        delta = n - since["by_resource"].get(key, 0)
        if delta and not key.startswith(("watch ", "discovery ")):
            out[key] += delta
    return dict(out)


def main() -> None:
    port = free_port()
    guests = StubGuests(port)
    moments = Moments()
    with (
        tempfile.TemporaryDirectory(prefix="bench-k8s-operator-") as tmp_s,
        EmulatorThread(namespaces=["default", "kube-system", NS]) as api,
    ):
        tmp = Path(tmp_s)
        controller = api.call(lambda em: VirtController(em, guests, step_seconds=0.001).start())  # type: ignore[arg-type]
        api.call(moments.install)
        api.call(
            lambda em: em.put_object(
                f"{G}/{contract.TEMPLATE_PLURAL}",
                {
                    "metadata": {"name": "base"},
                    "spec": {"source": {"containerDisk": {"image": "bench"}}, "agentPort": port},
                },
                NS,
            )
        )
        kubeconfig = api.write_kubeconfig(tmp / "kubeconfig", namespace=NS)
        env = {"KUBECONFIG": str(kubeconfig), "CYBERDESK_OPERATOR_NAMESPACE": NS, "CYBERDESK_OPERATOR_STANDALONE": "1"}
        operator = spawn([sys.executable, "-m", "instance_svc.operator"], env, tmp / "operator.log")

        def stats() -> dict[str, Any]:
            return api.call(lambda em: em.stats())

        def put(obj: dict[str, Any]) -> float:
            t = time.perf_counter()
            api.call(lambda em: em.put_object(INSTANCES, obj, NS))
            return t

        try:
            # Warm-up (the operator's start, its watches): one instance, not counted.
            put(_instance("i-warmup"))
            _wait(lambda: "i-warmup" in moments.status_running, 120, "the operator to start")

            # -- one lifecycle at a time ------------------------------------------------------------
            rows: list[dict[str, Any]] = []
            lifecycle_requests: list[dict[str, int]] = []
            create_to_vm, running_to_running, create_to_running, delete_to_gone = [], [], [], []
            for i in range(N):
                name = f"i-life-{i}"
                before = stats()
                t0 = put(_instance(name))
                _wait(lambda n=name: n in moments.status_running, 60, f"{name} Running")
                create_to_vm.append((moments.vm_written[name] - t0) * 1000)
                running_to_running.append((moments.status_running[name] - moments.vmi_running[name]) * 1000)
                create_to_running.append((moments.status_running[name] - t0) * 1000)
                t1 = time.perf_counter()
                api.call(lambda em, n=name: em.delete_object(INSTANCES, n, NS))
                _wait(lambda n=name: n in moments.gone, 60, f"{name} gone")
                delete_to_gone.append((moments.gone[name] - t1) * 1000)
                lifecycle_requests.append(_by_verb(stats(), before))
            for label, samples in (
                ("CR written -> VM written", create_to_vm),
                ("VMI Running -> status Running", running_to_running),
                ("CR written -> status Running", create_to_running),
                ("CR deleted -> CR gone (finalizer)", delete_to_gone),
            ):
                rows.append({"measure": label, **latency_summary(samples)})
            totals = [sum(r.values()) for r in lifecycle_requests]
            median_requests = sorted(totals)[len(totals) // 2]
            typical = lifecycle_requests[totals.index(median_requests)]

            # -- a burst ----------------------------------------------------------------------------
            before = stats()
            names = [f"i-burst-{i}" for i in range(BURST)]
            t0 = time.perf_counter()
            for name in names:
                api.call(lambda em, n=name: em.put_object(INSTANCES, _instance(n), NS))
            written = time.perf_counter()
            _wait(lambda: all(n in moments.vm_written for n in names), 600, "the burst's VMs")
            all_vms = max(moments.vm_written[n] for n in names)
            _wait(lambda: all(n in moments.status_running for n in names), 600, "the burst Running")
            all_running = max(moments.status_running[n] for n in names)
            burst_requests = sum(_by_verb(stats(), before).values())
            burst = {
                "instances": BURST,
                "write_all_crs_s": round(written - t0, 3),
                "all_vms_written_s": round(all_vms - t0, 3),
                "all_running_s": round(all_running - t0, 3),
                "vms_written_per_s": round(BURST / (all_vms - t0), 1),
                "instances_running_per_s": round(BURST / (all_running - t0), 1),
                "requests_per_instance_to_running": round(burst_requests / BURST, 2),
            }

            # -- idle: all of them Running, nothing changes -------------------------------------
            # First let kopf finish its own trailing writes of the burst (finalizers, annotations):
            # until two quiet seconds in a row.
            settle_start = time.perf_counter()
            quiet, last_total = 0, stats()["total"]
            while quiet < 2 and time.perf_counter() - settle_start < 120:
                time.sleep(1)
                total = stats()["total"]
                quiet = quiet + 1 if total == last_total else 0
                last_total = total
            burst["settled_s"] = round(time.perf_counter() - t0, 3)
            before = stats()
            time.sleep(IDLE_S)
            idle = _by_verb(stats(), before)

            # -- warm pool claims ---------------------------------------------------------------
            pool_size = 5
            api.call(
                lambda em: em.put_object(
                    f"{G}/{contract.WARM_POOL_PLURAL}",
                    {
                        "metadata": {"name": "warm"},
                        "spec": {"template": "base", "size": pool_size, "resources": RESOURCES},
                    },
                    NS,
                )
            )

            def ready_members() -> int:
                sel = f"{contract.LABEL_POOL}=warm,{contract.LABEL_POOL_STATE}=ready"
                return len(api.call(lambda em: em.list_objects(VMS, NS, sel)))

            claims = []
            for i in range(pool_size):
                _wait(lambda: ready_members() >= pool_size, 120, "the pool ready")
                name = f"i-claim-{i}"
                t0 = put(_instance(name, warmPool="warm"))
                try:
                    _wait(lambda n=name: n in moments.status_running, 60, f"{name} Running")
                except RuntimeError:
                    obj = api.call(lambda em, n=name: em.get_object(INSTANCES, n, NS))
                    print(f"{name}: {obj.get('status')}; the operator's log: {tmp / 'operator.log'}", file=sys.stderr)
                    raise
                obj = api.call(lambda em, n=name: em.get_object(INSTANCES, n, NS))
                if obj["status"].get("claimedFrom") != "warm":
                    raise RuntimeError(f"{name} was not claimed from the pool: {obj['status']}")
                claims.append((moments.status_running[name] - t0) * 1000)
            rows.append({"measure": "warm pool: CR written -> status Running", **latency_summary(claims)})

            sizes = api.call(
                lambda em: {
                    kind: len(json.dumps(em.get_object(key, name, NS)).encode())
                    for kind, key, name in (
                        ("CyberdeskInstance", INSTANCES, "i-burst-0"),
                        ("VirtualMachine", VMS, "i-burst-0"),
                        ("VirtualMachineInstance", VMIS, "i-burst-0"),
                        ("Secret", "/v1/secrets", "i-burst-0-agent"),
                        ("NetworkPolicy", "networking.k8s.io/v1/networkpolicies", "i-burst-0"),
                    )
                }
            )
        finally:
            stop(operator)
            api.call(lambda em: controller.stop())
            api.submit(guests.close()).result(60)
    report(
        "k8s_operator",
        rows,
        n=N,
        operator_requests_per_lifecycle_median=median_requests,
        operator_requests_per_lifecycle_typical=typical,
        burst=burst,
        idle_requests_in_window={"seconds": IDLE_S, "standing_instances": BURST, "requests": idle},
        object_bytes_per_instance_approx=sizes,
    )


if __name__ == "__main__":
    main()
