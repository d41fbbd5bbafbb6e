"""End to end on the kubevirt runtime: the real gateway, SDK, instance_svc, operator and guest agents.

One stack for the module (conftest.py): `cyberdesk up --runtime kubevirt` against the Kubernetes
API emulator, the KubeVirt stand-in booting a real guest agent per VM on loopback TLS, the real
instance operator, and a second instance_svc replica. Every CyberdeskInstance and
CyberdeskSnapshot instance_svc wrote is checked against its CRD (schema and CEL rules) at the end.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import uuid
from typing import Any

import grpc
import pytest

from cyberdesk import FailedPrecondition, NotFound
from cyberdesk_proto.internal.v1 import routing_pb2, routing_pb2_grpc
from cyberdesk_proto.v1 import instance_pb2, instance_pb2_grpc
from instance_svc.lifecycle import REPLICA_DIED
from instance_svc.operator import contract
from instance_svc.runtime.kubevirt import records
from instance_svc.runtime.kubevirt.store import quota_name
from instance_svc.states import State
from tests.k8s.runtime.conftest import (
    CONFIGMAPS,
    INSTANCES,
    NS,
    ORPHAN_TENANT,
    RACE_QUOTA,
    RACE_TENANT,
    SECRETS,
    SNAPSHOTS,
    VMS,
    Stack,
    channel,
)
from tests.support.kube_schemas import load_crds, validate_against_crd
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)
# Instances that ended early in the module: the last test sees their records let go after the
# retention (CYBERDESK_KUBE_RECORD_RETENTION, 20 s here) without waiting for it on purpose.
ENDED: list[str] = []


def _record(stack: Stack, instance_id: str) -> dict[str, Any]:
    obj = stack.cluster.get(INSTANCES, instance_id)
    assert obj is not None, f"no CyberdeskInstance {instance_id}"
    return json.loads(obj["metadata"]["annotations"][records.RECORD])


def test_create_exec_files_shell_then_expiry_at_the_deadline(stack: Stack) -> None:
    """Create -> VM object -> Running -> exec, files, a shell through the gateway -> SetTimeout -> expired, VM gone."""
    with stack.client() as client:
        box = client.instances.create(timeout=120, vcpus=2, memory_mib=1024, labels={"suite": "k8s"})
        assert box.state == "RUNNING"
        assert box.data.runtime == "kubevirt"
        obj = stack.cluster.get(INSTANCES, box.id)
        assert obj is not None and obj["spec"]["tenant"] == "dev"
        assert obj["spec"]["resources"] == {"vcpu": 2, "memoryMiB": 1024, "diskMiB": 2048}
        vm_name = obj["status"]["vmName"]
        assert stack.cluster.get(VMS, vm_name) is not None

        result = box.exec(["sh", "-c", "echo hello from the vm; echo err >&2"])
        assert result.exit_code == 0 and result.stdout_text == "hello from the vm\n"
        assert result.stderr_text == "err\n"
        box.files.write("/tmp/k8s.txt", "written through the gateway\n")
        assert box.files.read_text("/tmp/k8s.txt") == "written through the gateway\n"
        with box.shell(cols=80, rows=24) as term:
            term.send("echo $((6 * 7)); exit\n")
            assert "42" in b"".join(term).decode(errors="replace")

        # SetTimeout moves spec.deadline; the operator's timer expires the VM at the new deadline.
        before = obj["spec"]["deadline"]
        box.set_timeout(2)
        moved = stack.cluster.get(INSTANCES, box.id)
        assert moved is not None and moved["spec"]["deadline"] != before
        ended = wait_until("the instance to end at its deadline", lambda: _ended(client, box.id), timeout=30)
        assert ended.state == "TERMINATED", ended.state_message
        assert ended.state_message == "expired at its deadline"
        ENDED.append(box.id)
        assert stack.cluster.get(VMS, vm_name) is None
        assert stack.cluster.get(SECRETS, contract.secret_name(vm_name)) is None


def _ended(client: Any, instance_id: str) -> Any:
    data = client.instances.get(instance_id).data
    return data if data.state in ("TERMINATED", "FAILED") else None


def test_what_a_networkpolicy_cannot_filter_is_refused_before_anything_is_written(stack: Stack) -> None:
    before = len(stack.cluster.objects(INSTANCES))
    with stack.client() as client, pytest.raises(FailedPrecondition, match="host name") as refused:
        client.instances.create(internet=True, allow=["pypi.org"])
    assert "give CIDRs or IP addresses" in refused.value.message
    assert len(stack.cluster.objects(INSTANCES)) == before


def test_pause_and_resume_reach_kubevirts_subresources(stack: Stack) -> None:
    with stack.client() as client, client.instances.create(timeout=120, memory_mib=640) as box:
        vm = stack.cluster.get(INSTANCES, box.id)["status"]["vmName"]  # type: ignore[index]
        assert box.pause().state == "PAUSED"
        calls = stack.cluster.call(lambda em: list(em.subresource_calls))
        assert ("subresources.kubevirt.io", "virtualmachineinstances", "pause", "cyberdesk", vm) in calls
        with pytest.raises(FailedPrecondition):
            box.exec("true")
        assert box.resume().state == "RUNNING"
        calls = stack.cluster.call(lambda em: list(em.subresource_calls))
        assert ("subresources.kubevirt.io", "virtualmachineinstances", "unpause", "cyberdesk", vm) in calls
        assert box.exec("echo back").stdout_text == "back\n"


def test_snapshot_then_create_from_it(stack: Stack) -> None:
    with stack.client() as client:
        with client.instances.create(timeout=120, memory_mib=640) as src:
            src.files.write("/home/user/kept.txt", "from before the snapshot\n")
            snap = src.snapshot("k8s")
            obj = stack.cluster.get(SNAPSHOTS, snap.id)
            assert obj is not None and obj["status"]["phase"] == contract.SNAPSHOT_PHASE_READY
            assert obj["spec"] == {"tenant": "dev", "instance": src.id}
            assert client.snapshots.get(snap.id).id == snap.id
        with client.instances.create(snapshot_id=snap.id, timeout=120) as restored:
            assert restored.data.source_snapshot_id == snap.id
            spec = stack.cluster.get(INSTANCES, restored.id)["spec"]  # type: ignore[index]
            assert spec["sourceSnapshot"] == snap.id
            assert restored.files.read_text("/home/user/kept.txt") == "from before the snapshot\n"
        client.snapshots.delete(snap.id)
        wait_until("the CyberdeskSnapshot to go", lambda: stack.cluster.get(SNAPSHOTS, snap.id) is None)


def test_a_default_create_claims_from_the_warm_pool(stack: Stack) -> None:
    with stack.client() as client:
        wait_until(
            "a ready warm-pool member",
            lambda: any(
                (vm["metadata"].get("labels") or {}).get(contract.LABEL_POOL_STATE) == contract.POOL_STATE_READY
                for vm in stack.cluster.objects(VMS)
            ),
        )
        with client.instances.create(timeout=120) as box:
            status = stack.cluster.get(INSTANCES, box.id)["status"]  # type: ignore[index]
            assert status["claimedFrom"] == "base"
            assert status["vmName"] != box.id  # a member of the pool, not a VM of its own
            assert box.exec("echo claimed").stdout_text == "claimed\n"


def test_the_cli_works_as_on_the_local_runtime(stack: Stack) -> None:
    created = stack.cli("create", "--memory", "384", "--json")
    assert created.returncode == 0, created.stderr
    instance_id = json.loads(created.stdout)["instance_id"]
    ran = stack.cli("exec", instance_id, "--", "echo from the cli; exit 3")
    assert (ran.returncode, ran.stdout) == (3, b"from the cli\n"), ran.stderr
    assert stack.cli("rm", instance_id).returncode == 0
    assert _record(stack, instance_id)["state"] == State.TERMINATED.value


def test_delete_goes_through_the_finalizer_and_keeps_the_record(stack: Stack) -> None:
    with stack.client() as client:
        box = client.instances.create(timeout=120, memory_mib=768)
        vm = stack.cluster.get(INSTANCES, box.id)["status"]["vmName"]  # type: ignore[index]
        box.delete()
        obj = stack.cluster.get(INSTANCES, box.id)
        assert obj is not None, "the resource is the record of the TERMINATED instance"
        assert obj["metadata"]["deletionTimestamp"]
        assert obj["metadata"]["finalizers"] == [records.FINALIZER]  # the operator's is gone with the VM
        assert stack.cluster.get(VMS, vm) is None
        assert stack.cluster.get(SECRETS, contract.secret_name(vm)) is None
        data = client.instances.get(box.id).data
        assert data.state == "TERMINATED" and data.state_message == "deleted"
        assert box.id in [i.id for i in client.instances.list(states=["TERMINATED"])]
        ENDED.append(box.id)


def test_one_request_id_sent_to_both_replicas_at_once_makes_one_instance(stack: Stack) -> None:
    assert stack.replica is not None
    request = instance_pb2.CreateInstanceRequest(template="base", memory_mib=320, request_id=f"idem-{uuid.uuid4()}")

    def create(target: str) -> instance_pb2.Instance:
        with channel(target) as chan:
            stub = instance_pb2_grpc.InstanceServiceStub(chan)
            return stub.CreateInstance(request, metadata=stack.metadata("idem"), timeout=120).instance

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(create, [stack.instance_addr, stack.replica.target]))
    assert got[0].instance_id == got[1].instance_id
    # The replica that found the other's create waits for it, as a retry on one replica does.
    assert [g.state for g in got] == [instance_pb2.INSTANCE_STATE_RUNNING] * 2
    mine = [o for o in stack.cluster.objects(INSTANCES) if o["spec"]["tenant"] == "idem"]
    assert [o["metadata"]["name"] for o in mine] == [got[0].instance_id]
    assert mine[0]["metadata"]["annotations"][contract.ANNOTATION_REQUEST_ID] == request.request_id


def _create(target: str, stack: Stack, n: int, tenant: str = RACE_TENANT) -> str:
    with channel(target) as chan:
        stub = instance_pb2_grpc.InstanceServiceStub(chan)
        try:
            reply = stub.CreateInstance(
                instance_pb2.CreateInstanceRequest(
                    template="base", memory_mib=256, request_id=f"race-{n}-{uuid.uuid4().hex[:8]}"
                ),
                metadata=stack.metadata(tenant),
                timeout=120,
            )
        except grpc.RpcError as err:
            return err.code().name
        state = instance_pb2.InstanceState.Name(reply.instance.state)
        return (
            state
            if reply.instance.state == instance_pb2.INSTANCE_STATE_RUNNING
            else f"{state}: {reply.instance.state_message}"
        )


def test_two_replicas_racing_fifty_creates_against_a_quota_of_ten(stack: Stack) -> None:
    assert stack.replica is not None
    targets = [stack.instance_addr, stack.replica.target]
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(lambda n: _create(targets[n % 2], stack, n), range(50)))
    counted = collections.Counter(outcomes)
    assert counted == {"INSTANCE_STATE_RUNNING": RACE_QUOTA, "RESOURCE_EXHAUSTED": 50 - RACE_QUOTA}, counted
    live = [
        o for o in stack.cluster.objects(INSTANCES) if o["spec"]["tenant"] == RACE_TENANT and _state(o) == "RUNNING"
    ]
    assert len(live) == RACE_QUOTA
    cm = stack.cluster.get(CONFIGMAPS, quota_name(RACE_TENANT))
    assert cm is not None and len(json.loads(cm["data"]["reservations"])) == RACE_QUOTA

    # kill -9 of the second replica and a new start of it: it re-adopts from the cluster (nothing
    # of its own survives), ends nothing another replica holds, and serves as before.
    stack.restart_replica()
    assert len([o for o in stack.cluster.objects(INSTANCES) if _state(o) == "RUNNING"]) >= RACE_QUOTA

    # Either replica routes to (and deletes) what the other started.
    one = live[0]["metadata"]["name"]
    for target in targets:
        with channel(target) as chan:
            reply = routing_pb2_grpc.RoutingServiceStub(chan).ResolveInstance(
                routing_pb2.ResolveInstanceRequest(tenant_id=RACE_TENANT, instance_id=one),
                metadata=stack.metadata(RACE_TENANT)[:1],
                timeout=30,
            )
            assert reply.agent_target.startswith("127.78.") and reply.agent_token and reply.agent_ca_pem

    def delete(target: str, instance_id: str) -> str:
        with channel(target) as chan:
            reply = instance_pb2_grpc.InstanceServiceStub(chan).DeleteInstance(
                instance_pb2.DeleteInstanceRequest(instance_id=instance_id),
                metadata=stack.metadata(RACE_TENANT),
                timeout=60,
            )
            return instance_pb2.InstanceState.Name(reply.instance.state)

    # Both replicas delete every instance at the same time: every call succeeds with TERMINATED.
    with concurrent.futures.ThreadPoolExecutor(2 * RACE_QUOTA) as pool:
        deletes = [pool.submit(delete, t, o["metadata"]["name"]) for o in live for t in targets]
        assert {d.result() for d in deletes} == {"INSTANCE_STATE_TERMINATED"}
    cm = stack.cluster.get(CONFIGMAPS, quota_name(RACE_TENANT))
    assert cm is not None and json.loads(cm["data"]["reservations"]) == {}


def test_creates_of_a_replica_killed_in_their_middle_end_failed_and_free_the_quota(stack: Stack) -> None:
    """kill -9 of the replica creating three instances while their VMs boot: the other replica ends them."""
    assert stack.replica is not None
    replica = stack.replica
    controller = stack.cluster.emulated.controller
    assert controller is not None

    def hold(kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        # On the emulator's loop, before the operator has seen it: its VM will not get past Scheduling.
        if kind == "ADDED" and obj["spec"]["tenant"] == ORPHAN_TENANT:
            controller.held.add((obj["metadata"]["namespace"], obj["metadata"]["name"]))

    def held() -> list[str]:
        return stack.cluster.call(lambda em: [name for _ns, name in controller.held])

    stack.cluster.call(lambda em: em.listeners[INSTANCES].append(hold))
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            calls = [pool.submit(_create, replica.target, stack, n, ORPHAN_TENANT) for n in range(3)]
            names = wait_until("three creates held while their VMs boot", lambda: _all_three(held()))
            replica.proc.kill()
            replica.proc.wait()
            assert [c.result() for c in calls] == ["UNAVAILABLE"] * 3
        for name in names:
            ended = lambda n=name: _state(stack.cluster.get(INSTANCES, n)) == "FAILED"  # type: ignore[arg-type]  # noqa: E731
            wait_until(f"{name} to be ended by the other replica", ended)
            assert _record(stack, name)["state_message"] == REPLICA_DIED
        cm = stack.cluster.get(CONFIGMAPS, quota_name(ORPHAN_TENANT))
        assert cm is not None and json.loads(cm["data"]["reservations"]) == {}
    finally:
        stack.cluster.call(lambda em: em.listeners[INSTANCES].remove(hold))
        for name in held():
            stack.cluster.call(lambda em, n=name: controller.release(NS, n))
        stack.restart_replica(kill=False)


def _all_three(names: list[str]) -> list[str] | None:
    return names if len(names) == 3 else None


def _state(obj: dict[str, Any]) -> str:
    return str(records.record_of(obj).state.name)  # type: ignore[union-attr]


def test_every_resource_instance_svc_wrote_validates_against_its_crd(stack: Stack) -> None:
    crds = load_crds()
    instances = stack.cluster.objects(INSTANCES)
    snapshots = stack.cluster.objects(SNAPSHOTS)
    assert len(instances) >= RACE_QUOTA
    for obj in instances:
        validate_against_crd(obj, crds[(contract.GROUP, contract.INSTANCE_KIND)])
    for obj in snapshots:
        validate_against_crd(obj, crds[(contract.GROUP, contract.SNAPSHOT_KIND)])


def test_ended_instances_resources_go_after_the_record_retention(stack: Stack) -> None:
    assert len(ENDED) == 2, "the expiry and the delete tests ran first"
    for instance_id in ENDED:
        gone = lambda i=instance_id: stack.cluster.get(INSTANCES, i) is None  # noqa: E731
        wait_until(f"{instance_id}'s record to be let go", gone)
    with stack.client() as client, pytest.raises(NotFound):
        client.instances.get(ENDED[0])
