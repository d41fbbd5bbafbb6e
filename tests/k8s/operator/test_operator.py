"""The instance operator, for real (kopf, kubernetes clients) against the emulator and the KubeVirt stand-in.

Every instance here gets a real guest agent (kube_emulator.guest) booted from its VM's cloud-init
Secret, listening with TLS on a loopback address; the operator reaches it as it would in a VM.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import kubernetes
import pytest
import yaml
from kubernetes.client import ApiException

from cyberdesk_common.agent_channel import agent_metadata, open_agent_channel
from cyberdesk_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from cyberdesk_proto.v1 import process_pb2, process_pb2_grpc
from instance_svc.operator import contract
from instance_svc.runtime.base import AgentEndpoint
from kube_emulator.cluster import EmulatedCluster, OperatorThread
from tests.k8s.operator.conftest import (
    INSTANCES,
    NS,
    POLICIES,
    SECRETS,
    SNAPSHOTS,
    VMIS,
    VMS,
    in_seconds,
    instance_body,
    wait_for,
)
from tests.support.kube_schemas import CRD_DIR, validate_against_crd, validate_builtin, validate_kubevirt

G, V = contract.GROUP, contract.VERSION


@pytest.fixture(scope="module")
def operator(cluster: EmulatedCluster) -> Iterator[OperatorThread]:
    env = {
        "CYBERDESK_OPERATOR_NAMESPACE": NS,
        "CYBERDESK_OPERATOR_STANDALONE": "1",
        "CYBERDESK_OPERATOR_ID": "test-operator",
        "CYBERDESK_OPERATOR_RETRY_MAX": "0.5",
    }
    with OperatorThread(cluster.kubeconfig, env) as op:
        yield op


def phase_of(cluster: EmulatedCluster, name: str) -> str | None:
    obj = cluster.get(INSTANCES, name)
    return (obj or {}).get("status", {}).get("phase")


def wait_phase(cluster: EmulatedCluster, name: str, phase: str, timeout: float = 30.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = cluster.get(INSTANCES, name)
        return obj if (obj or {}).get("status", {}).get("phase") == phase else None

    obj: dict[str, Any] = wait_for(check, timeout, f"{name} to be {phase} (is {phase_of(cluster, name)})")
    return obj


def endpoint_of(cluster: EmulatedCluster, obj: dict[str, Any]) -> AgentEndpoint:
    status = obj["status"]
    secret = cluster.get(SECRETS, status["agentSecret"])
    assert secret is not None
    data = secret["data"]
    return AgentEndpoint(
        target=status["agentEndpoint"],
        token=base64.b64decode(data[contract.SECRET_KEY_TOKEN]).decode(),
        ca_pem=base64.b64decode(data[contract.SECRET_KEY_CA]).decode(),
        server_name=status["agentServerName"],
    )


def agent_info(endpoint: AgentEndpoint, token: str | None = None) -> agent_pb2.GetAgentInfoResponse:
    async def call() -> agent_pb2.GetAgentInfoResponse:
        async with open_agent_channel(endpoint) as chan:
            stub = agent_pb2_grpc.AgentServiceStub(chan)
            return await stub.GetAgentInfo(
                agent_pb2.GetAgentInfoRequest(),
                metadata=agent_metadata(endpoint.token if token is None else token),
                timeout=10,
            )

    return asyncio.run(call())


def run_in(endpoint: AgentEndpoint, instance: str, argv: list[str]) -> bytes:
    async def call() -> bytes:
        async with open_agent_channel(endpoint) as chan:
            stub = process_pb2_grpc.ProcessServiceStub(chan)
            reply = await stub.RunProcess(
                process_pb2.RunProcessRequest(instance_id=instance, argv=argv),
                metadata=agent_metadata(endpoint.token),
                timeout=30,
            )
            return bytes(reply.stdout)

    return asyncio.run(call())


def create(custom: kubernetes.client.CustomObjectsApi, body: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = custom.create_namespaced_custom_object(G, V, NS, contract.INSTANCE_PLURAL, body)
    return result


def test_create_writes_secret_vm_and_policy_then_runs_with_the_agent_answering(
    cluster: EmulatedCluster, operator: OperatorThread, custom: kubernetes.client.CustomObjectsApi
) -> None:
    env_secret = {
        "metadata": {"name": "i-create-env"},
        "data": {"GREETING": base64.b64encode(b"hello from the CR").decode()},
    }
    kubernetes.client.CoreV1Api(custom.api_client).create_namespaced_secret(NS, env_secret)
    body = instance_body(
        "i-create",
        network={"mode": "Internet", "egress": {"allow": ["203.0.113.0/24"], "deny": ["203.0.113.7"]}},
        envSecret="i-create-env",
    )
    validate_against_crd(body, CRD_DIR / f"{contract.INSTANCE_PLURAL}.yaml")
    created = create(custom, body)
    obj = wait_phase(cluster, "i-create", contract.PHASE_RUNNING)
    uid = created["metadata"]["uid"]

    vm = cluster.get(VMS, "i-create")
    secret = cluster.get(SECRETS, contract.secret_name("i-create"))
    policy = cluster.get(POLICIES, "i-create")
    assert vm and secret and policy
    for dependent in (vm, secret, policy):
        refs = dependent["metadata"]["ownerReferences"]
        assert [(r["kind"], r["uid"], r["controller"]) for r in refs] == [(contract.INSTANCE_KIND, uid, True)]
        assert dependent["metadata"]["labels"][contract.LABEL_INSTANCE] == "i-create"
        assert dependent["metadata"]["labels"][contract.LABEL_TENANT] == "t1"
    validate_kubevirt(vm)
    validate_builtin(secret)
    validate_builtin(policy)
    validate_against_crd(obj, CRD_DIR / f"{contract.INSTANCE_PLURAL}.yaml")

    # The token and TLS material travel by the Secret (cloud-init secretRef), never inline in the VM.
    volumes = vm["spec"]["template"]["spec"]["volumes"]
    assert {"name": "cloudinitdisk", "cloudInitNoCloud": {"secretRef": {"name": "i-create-agent"}}} in volumes
    token = base64.b64decode(secret["data"][contract.SECRET_KEY_TOKEN]).decode()
    assert token not in json.dumps(vm)
    userdata = base64.b64decode(secret["data"][contract.SECRET_KEY_USERDATA]).decode()
    assert userdata.startswith("#cloud-config\n")
    assert token in [f["content"] for f in yaml.safe_load(userdata)["write_files"]]
    assert vm["metadata"]["annotations"][contract.ANNOTATION_INSTANCE_UID] == uid

    # Only the platform's components reach the agent port; egress per the policy, never private ranges.
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {contract.LABEL_VM: "i-create"}}
    sources = spec["ingress"][0]["from"][0]["podSelector"]["matchExpressions"]
    assert {
        "key": contract.LABEL_COMPONENT,
        "operator": "In",
        "values": ["gateway", "instance-svc", "instance-operator"],
    } in sources
    blocks = [t["ipBlock"] for t in spec["egress"][0]["to"]]
    assert blocks == [{"cidr": "203.0.113.0/24", "except": ["203.0.113.7/32"]}]

    # The status mirrors the VMI and carries where the agent answers.
    status = obj["status"]
    vmi = cluster.get(VMIS, "i-create")
    assert vmi is not None
    ip = vmi["status"]["interfaces"][0]["ipAddress"]
    assert status["ip"] == ip and status["vmiPhase"] == "Running" and status["vmName"] == "i-create"
    assert status["agentEndpoint"].startswith(ip + ":")
    assert status["expiry"] == body["spec"]["deadline"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        contract.CONDITION_VM_READY: "True",
        contract.CONDITION_AGENT_READY: "True",
        contract.CONDITION_PAUSED: "False",
    }
    endpoint = endpoint_of(cluster, obj)
    assert agent_info(endpoint).instance_id == "i-create"  # bound by the operator
    with pytest.raises(grpc.aio.AioRpcError) as e:
        agent_info(endpoint, token="not-the-token-of-this-instance")
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The env Secret reached the agent (ConfigureAgent) and is now the instance's to clean up.
    assert run_in(endpoint, "i-create", ["printenv", "GREETING"]) == b"hello from the CR\n"
    env_refs = (cluster.get(SECRETS, "i-create-env") or {})["metadata"]["ownerReferences"]
    assert [r["uid"] for r in env_refs] == [uid]


def test_expiry_fires_at_the_deadline_and_follows_a_moved_deadline(
    cluster: EmulatedCluster, operator: OperatorThread, custom: kubernetes.client.CustomObjectsApi
) -> None:
    # One instance's deadline is moved earlier (the timer re-arms sooner), one's is moved later.
    # i-later gets its near deadline only once it runs, and keeps it only until the operator has
    # mirrored it: created with it, a loaded machine once took longer than it to start the VM.
    create(custom, instance_body("i-sooner", deadline=600))
    create(custom, instance_body("i-later", deadline=600))
    wait_phase(cluster, "i-sooner", contract.PHASE_RUNNING)
    wait_phase(cluster, "i-later", contract.PHASE_RUNNING)
    first_deadline = time.time() + 4
    near = in_seconds(4)
    custom.patch_namespaced_custom_object(G, V, NS, contract.INSTANCE_PLURAL, "i-later", {"spec": {"deadline": near}})
    wait_for(
        lambda: (cluster.get(INSTANCES, "i-later") or {}).get("status", {}).get("expiry") == near,
        what="the near deadline seen",
    )
    custom.patch_namespaced_custom_object(
        G, V, NS, contract.INSTANCE_PLURAL, "i-later", {"spec": {"deadline": in_seconds(600)}}
    )
    custom.patch_namespaced_custom_object(
        G, V, NS, contract.INSTANCE_PLURAL, "i-sooner", {"spec": {"deadline": in_seconds(1)}}
    )
    obj = wait_phase(cluster, "i-sooner", contract.PHASE_EXPIRED, timeout=20)
    assert obj["status"]["reason"] == contract.REASON_DEADLINE_REACHED
    wait_for(lambda: cluster.get(VMS, "i-sooner") is None and cluster.get(VMIS, "i-sooner") is None, what="the VM gone")
    assert cluster.get(SECRETS, "i-sooner-agent") is None
    # Past i-later's first deadline (a wall-clock time, not a synchronisation): it still runs.
    time.sleep(max(0.0, first_deadline + 1.0 - time.time()))
    later = cluster.get(INSTANCES, "i-later")
    assert later is not None and later["status"]["phase"] == contract.PHASE_RUNNING
    assert cluster.get(VMS, "i-later") is not None


def test_pause_and_resume_go_through_the_subresources(
    cluster: EmulatedCluster, operator: OperatorThread, custom: kubernetes.client.CustomObjectsApi
) -> None:
    create(custom, instance_body("i-pause"))
    running = wait_phase(cluster, "i-pause", contract.PHASE_RUNNING)
    custom.patch_namespaced_custom_object(G, V, NS, contract.INSTANCE_PLURAL, "i-pause", {"spec": {"paused": True}})
    paused = wait_phase(cluster, "i-pause", contract.PHASE_PAUSED)
    vmi = cluster.get(VMIS, "i-pause")
    assert vmi is not None
    assert any(c["type"] == "Paused" and c["status"] == "True" for c in vmi["status"]["conditions"])
    assert paused["status"]["agentEndpoint"] == running["status"]["agentEndpoint"]
    custom.patch_namespaced_custom_object(G, V, NS, contract.INSTANCE_PLURAL, "i-pause", {"spec": {"paused": False}})
    wait_phase(cluster, "i-pause", contract.PHASE_RUNNING)
    calls = cluster.call(lambda em: [c[2] for c in em.subresource_calls if c[4] == "i-pause"])
    assert calls == ["pause", "unpause"]
    assert agent_info(endpoint_of(cluster, running)).instance_id == "i-pause"  # thawed: it answers again


def test_snapshot_then_restore_into_a_new_instance(
    cluster: EmulatedCluster, operator: OperatorThread, custom: kubernetes.client.CustomObjectsApi
) -> None:
    create(custom, instance_body("i-src"))
    src = wait_phase(cluster, "i-src", contract.PHASE_RUNNING)
    home = cluster.guests.vms[(NS, "i-src")].home
    (home / "notes.txt").write_text("kept across the snapshot\n")
    snap_body = {
        "apiVersion": f"{G}/{V}",
        "kind": contract.SNAPSHOT_KIND,
        "metadata": {"name": "s-1", "labels": {contract.LABEL_TENANT: "t1"}},
        "spec": {"tenant": "t1", "instance": "i-src", "displayName": "first"},
    }
    validate_against_crd(snap_body, CRD_DIR / f"{contract.SNAPSHOT_PLURAL}.yaml")
    custom.create_namespaced_custom_object(G, V, NS, contract.SNAPSHOT_PLURAL, snap_body)

    def ready() -> dict[str, Any] | None:
        obj = cluster.get(SNAPSHOTS, "s-1")
        return obj if (obj or {}).get("status", {}).get("phase") == contract.SNAPSHOT_PHASE_READY else None

    snap = wait_for(ready, what="snapshot Ready")
    vm_snapshot = cluster.get("snapshot.kubevirt.io/v1beta1/virtualmachinesnapshots", "s-1")
    assert vm_snapshot is not None
    validate_kubevirt(vm_snapshot)
    assert vm_snapshot["spec"]["source"] == {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "i-src"}
    assert snap["status"]["template"] == "base" and snap["status"]["sizeBytes"] > 0
    validate_against_crd(snap, CRD_DIR / f"{contract.SNAPSHOT_PLURAL}.yaml")

    create(custom, instance_body("i-restored", sourceSnapshot="s-1"))
    restored = wait_phase(cluster, "i-restored", contract.PHASE_RUNNING)
    restore = cluster.get("snapshot.kubevirt.io/v1beta1/virtualmachinerestores", "i-restored-restore")
    assert restore is not None
    validate_kubevirt(restore)
    vm = cluster.get(VMS, "i-restored")
    assert vm is not None
    assert vm["metadata"]["ownerReferences"][0]["name"] == "i-restored"
    volumes = vm["spec"]["template"]["spec"]["volumes"]
    assert {"name": "cloudinitdisk", "cloudInitNoCloud": {"secretRef": {"name": "i-restored-agent"}}} in volumes
    # A new VM with its own token, and the files of the snapshot.
    assert endpoint_of(cluster, restored).token != endpoint_of(cluster, src).token
    assert agent_info(endpoint_of(cluster, restored)).instance_id == "i-restored"
    assert (cluster.guests.vms[(NS, "i-restored")].home / "notes.txt").read_text() == "kept across the snapshot\n"
    assert restored["status"]["restoredFrom"] == "s-1"


def test_warm_pool_claim_adopts_a_running_vm_and_the_pool_refills(
    cluster: EmulatedCluster, operator: OperatorThread, custom: kubernetes.client.CustomObjectsApi
) -> None:
    pool = {
        "apiVersion": f"{G}/{V}",
        "kind": contract.WARM_POOL_KIND,
        "metadata": {"name": "warm"},
        "spec": {"template": "base", "size": 2, "resources": {"vcpu": 1, "memoryMiB": 512, "diskMiB": 2048}},
    }
    validate_against_crd(pool, CRD_DIR / f"{contract.WARM_POOL_PLURAL}.yaml")
    custom.create_namespaced_custom_object(G, V, NS, contract.WARM_POOL_PLURAL, pool)

    def ready_members() -> list[dict[str, Any]]:
        return cluster.list(VMS, f"{contract.LABEL_POOL}=warm,{contract.LABEL_POOL_STATE}=ready")

    members = wait_for(lambda: len(ready_members()) == 2 and ready_members(), what="two ready pool members")
    for member in members:
        validate_kubevirt(member)
        assert member["metadata"]["ownerReferences"][0]["kind"] == contract.WARM_POOL_KIND
    names = {m["metadata"]["name"] for m in members}

    create(custom, instance_body("i-warm", warmPool="warm"))
    obj = wait_phase(cluster, "i-warm", contract.PHASE_RUNNING)
    status = obj["status"]
    assert status["vmName"] in names and status["claimedFrom"] == "warm"
    vm = cluster.get(VMS, status["vmName"])
    secret = cluster.get(SECRETS, status["agentSecret"])
    assert vm is not None and secret is not None
    uid = obj["metadata"]["uid"]
    assert [r["uid"] for r in vm["metadata"]["ownerReferences"]] == [uid]
    assert [r["uid"] for r in secret["metadata"]["ownerReferences"]] == [uid]
    assert contract.LABEL_POOL not in vm["metadata"]["labels"]
    assert vm["metadata"]["labels"][contract.LABEL_INSTANCE] == "i-warm"
    claimed = {c["type"]: c for c in status["conditions"]}[contract.CONDITION_WARM_POOL_CLAIMED]
    assert claimed["status"] == "True"
    assert agent_info(endpoint_of(cluster, obj)).instance_id == "i-warm"
    # The pool starts a replacement (a new name: serials are never reused).
    refilled = wait_for(lambda: len(ready_members()) == 2 and ready_members(), what="the pool refilled")
    assert status["vmName"] not in {m["metadata"]["name"] for m in refilled}

    # An instance of another shape is not given a pool VM: it gets one of its own.
    other = instance_body("i-cold", warmPool="warm")
    other["spec"]["resources"]["vcpu"] = 2
    create(custom, other)
    cold = wait_phase(cluster, "i-cold", contract.PHASE_RUNNING)
    assert cold["status"]["vmName"] == "i-cold"
    reason = {c["type"]: c for c in cold["status"]["conditions"]}[contract.CONDITION_WARM_POOL_CLAIMED]["reason"]
    assert reason == contract.REASON_WARM_POOL_MISMATCH


def test_delete_runs_the_finalizer_and_removes_everything(
    cluster: EmulatedCluster, operator: OperatorThread, custom: kubernetes.client.CustomObjectsApi
) -> None:
    create(custom, instance_body("i-delete"))
    wait_phase(cluster, "i-delete", contract.PHASE_RUNNING)
    obj = cluster.get(INSTANCES, "i-delete")
    assert obj is not None and contract.FINALIZER in obj["metadata"]["finalizers"]
    guest = cluster.guests.vms[(NS, "i-delete")]
    custom.delete_namespaced_custom_object(G, V, NS, contract.INSTANCE_PLURAL, "i-delete")
    wait_for(lambda: cluster.get(INSTANCES, "i-delete") is None, what="the instance gone")
    assert cluster.get(VMS, "i-delete") is None
    assert cluster.get(VMIS, "i-delete") is None
    assert cluster.get(SECRETS, "i-delete-agent") is None
    assert cluster.get(POLICIES, "i-delete") is None
    assert guest.proc is not None and guest.proc.poll() is not None  # the guest was shut down


def test_a_vm_deleted_behind_the_operators_back_fails_the_instance(
    cluster: EmulatedCluster, operator: OperatorThread, custom: kubernetes.client.CustomObjectsApi
) -> None:
    create(custom, instance_body("i-gone"))
    wait_phase(cluster, "i-gone", contract.PHASE_RUNNING)
    custom.delete_namespaced_custom_object("kubevirt.io", "v1", NS, "virtualmachines", "i-gone")
    failed = wait_phase(cluster, "i-gone", contract.PHASE_FAILED)
    assert failed["status"]["reason"] == contract.REASON_VM_GONE
    assert cluster.get(VMS, "i-gone") is None  # and it is not recreated


def test_bad_specs_are_refused_or_fail_with_a_reason(
    cluster: EmulatedCluster, operator: OperatorThread, custom: kubernetes.client.CustomObjectsApi
) -> None:
    bad = instance_body("i-bad")
    bad["spec"]["resources"]["memoryMiB"] = 1
    with pytest.raises(ApiException) as e:
        create(custom, bad)
    assert e.value.status == 422 and "spec.resources.memoryMiB" in json.loads(e.value.body)["message"]
    create(custom, instance_body("i-notemplate", template="no-such-template"))
    failed = wait_phase(cluster, "i-notemplate", contract.PHASE_FAILED)
    assert failed["status"]["reason"] == contract.REASON_TEMPLATE_NOT_FOUND
    assert cluster.get(VMS, "i-notemplate") is None
    create(custom, instance_body("i-nosnap", sourceSnapshot="no-such-snapshot"))
    assert (
        wait_phase(cluster, "i-nosnap", contract.PHASE_FAILED)["status"]["reason"] == contract.REASON_SNAPSHOT_NOT_FOUND
    )


def test_the_operator_resumes_its_watches_after_the_api_server_drops_them(
    cluster: EmulatedCluster, operator: OperatorThread, custom: kubernetes.client.CustomObjectsApi
) -> None:
    """Every watch connection is closed (as an API server restart does); kopf re-watches from its resourceVersion."""
    before = cluster.call(lambda em: em.stats()["by_verb"].get("watch", 0))
    cluster.call(lambda em: em.close_watches())
    wait_for(
        lambda: cluster.call(lambda em: em.stats()["by_verb"].get("watch", 0)) > before, what="kopf to watch again"
    )
    create(custom, instance_body("i-rewatched"))
    obj = wait_phase(cluster, "i-rewatched", contract.PHASE_RUNNING)
    assert agent_info(endpoint_of(cluster, obj)).instance_id == "i-rewatched"
