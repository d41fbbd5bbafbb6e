"""The Kubernetes API emulator behaves as the API server where the operator and the runtime rely on it.

Driven with the real `kubernetes` client over HTTP, as every user of the emulator drives it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client import ApiException

from kube_emulator import EmulatorThread
from kube_emulator.virt_controller import VirtController

NS = "emu"
G, V = "cyberdesk.io", "v1alpha1"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorThread]:
    with EmulatorThread(namespaces=[NS]) as emu:
        controller = emu.call(lambda em: VirtController(em).start())
        yield emu
        emu.call(lambda em: controller.stop())


@pytest.fixture(scope="module")
def client(api: EmulatorThread, tmp_path_factory: pytest.TempPathFactory) -> kubernetes.client.ApiClient:
    path = api.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")
    return kubernetes.config.new_client_from_config(str(path))


def _instance(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "CyberdeskInstance",
        "metadata": {"name": name, "labels": {"cyberdesk.io/tenant": spec.get("tenant", "t1")}},
        "spec": {
            "tenant": "t1",
            "template": "base",
            "resources": {"vcpu": 1, "memoryMiB": 512, "diskMiB": 2048},
            "deadline": "2030-01-01T00:00:00Z",
            **spec,
        },
    }


def _raw(client: kubernetes.client.ApiClient, method: str, path: str, body: Any = None) -> Any:
    """A request the typed API has no method for (kubernetes 37's ApiClient.call_api)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    resp = client.call_api(method, client.configuration.host + path, header_params=headers, body=body)
    data = resp.read()
    if resp.status >= 400:
        raise ApiException(status=resp.status, reason=resp.reason)
    return json.loads(data) if data else None


def _wait(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_create_sets_server_metadata_and_answers_201(client: kubernetes.client.ApiClient) -> None:
    co = kubernetes.client.CustomObjectsApi(client)
    data, status, _ = co.create_namespaced_custom_object_with_http_info(
        G, V, NS, "cyberdeskinstances", _instance("i-create")
    )
    assert status == 201
    meta = data["metadata"]
    assert meta["namespace"] == NS and meta["uid"] and meta["resourceVersion"] and meta["generation"] == 1
    assert meta["creationTimestamp"].endswith("Z")
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object(G, V, NS, "cyberdeskinstances", _instance("i-create"))
    assert e.value.status == 409 and json.loads(e.value.body)["reason"] == "AlreadyExists"
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object(G, V, "no-such-ns", "cyberdeskinstances", _instance("i-x"))
    assert e.value.status == 404


def test_schema_prunes_unknown_fields_and_rejects_invalid_ones(client: kubernetes.client.ApiClient) -> None:
    co = kubernetes.client.CustomObjectsApi(client)
    body = _instance("i-prune")
    body["spec"]["typo"] = True
    created = co.create_namespaced_custom_object(G, V, NS, "cyberdeskinstances", body)
    assert "typo" not in created["spec"]
    bad = _instance("i-bad")
    bad["spec"]["resources"]["vcpu"] = 0
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object(G, V, NS, "cyberdeskinstances", bad)
    assert e.value.status == 422 and "spec.resources.vcpu" in json.loads(e.value.body)["message"]


def test_stale_resource_version_conflicts_and_generation_moves_on_spec_only(
    client: kubernetes.client.ApiClient,
) -> None:
    co = kubernetes.client.CustomObjectsApi(client)
    created = co.create_namespaced_custom_object(G, V, NS, "cyberdeskinstances", _instance("i-rv"))
    rv = created["metadata"]["resourceVersion"]
    patched = co.patch_namespaced_custom_object(G, V, NS, "cyberdeskinstances", "i-rv", {"spec": {"paused": True}})
    assert patched["metadata"]["generation"] == 2 and patched["metadata"]["resourceVersion"] != rv
    # A label is metadata: no new generation.
    labelled = co.patch_namespaced_custom_object(
        G, V, NS, "cyberdeskinstances", "i-rv", {"metadata": {"labels": {"a": "b"}}}
    )
    assert labelled["metadata"]["generation"] == 2
    # A patch that changes nothing changes no resourceVersion.
    same = co.patch_namespaced_custom_object(
        G, V, NS, "cyberdeskinstances", "i-rv", {"metadata": {"labels": {"a": "b"}}}
    )
    assert same["metadata"]["resourceVersion"] == labelled["metadata"]["resourceVersion"]
    for stale_write in (
        lambda: co.patch_namespaced_custom_object(
            G, V, NS, "cyberdeskinstances", "i-rv", {"metadata": {"resourceVersion": rv}, "spec": {"paused": False}}
        ),
        lambda: co.replace_namespaced_custom_object(
            G, V, NS, "cyberdeskinstances", "i-rv", {**created, "spec": created["spec"]}
        ),
    ):
        with pytest.raises(ApiException) as e:
            stale_write()
        assert e.value.status == 409
    fresh = co.get_namespaced_custom_object(G, V, NS, "cyberdeskinstances", "i-rv")
    fresh["spec"]["paused"] = False
    replaced = co.replace_namespaced_custom_object(G, V, NS, "cyberdeskinstances", "i-rv", fresh)
    assert replaced["spec"]["paused"] is False and replaced["metadata"]["generation"] == 3
    # A merge patch's null removes the key.
    unlabelled = co.patch_namespaced_custom_object(
        G, V, NS, "cyberdeskinstances", "i-rv", {"metadata": {"labels": {"a": None}}}
    )
    assert "a" not in unlabelled["metadata"]["labels"]


def test_status_subresource_writes_only_status(client: kubernetes.client.ApiClient) -> None:
    co = kubernetes.client.CustomObjectsApi(client)
    body = _instance("i-status")
    body["status"] = {"phase": "Running"}
    created = co.create_namespaced_custom_object(G, V, NS, "cyberdeskinstances", body)
    assert "status" not in created  # ignored on create: status is a subresource
    after = co.patch_namespaced_custom_object_status(
        G, V, NS, "cyberdeskinstances", "i-status", {"status": {"phase": "Starting"}, "spec": {"paused": True}}
    )
    assert after["status"] == {"phase": "Starting"} and "paused" not in after["spec"]
    assert after["metadata"]["generation"] == 1
    main = co.patch_namespaced_custom_object(
        G, V, NS, "cyberdeskinstances", "i-status", {"status": {"phase": "Failed"}}
    )
    assert main["status"] == {"phase": "Starting"}


def test_lists_carry_kind_and_resource_version_and_filter_by_labels(client: kubernetes.client.ApiClient) -> None:
    core = kubernetes.client.CoreV1Api(client)
    for name, tier in (("s-a", "gold"), ("s-b", "silver"), ("s-c", "gold")):
        core.create_namespaced_secret(NS, {"metadata": {"name": name, "labels": {"tier": tier, "sel": "yes"}}})
    listed = _raw(client, "GET", f"/api/v1/namespaces/{NS}/secrets?labelSelector=sel%3Dyes%2Ctier%20in%20%28gold%29")
    assert (
        listed["kind"] == "SecretList"
        and listed["apiVersion"] == "v1"
        and int(listed["metadata"]["resourceVersion"]) > 0
    )
    assert [i["metadata"]["name"] for i in listed["items"]] == ["s-a", "s-c"]
    assert [s.metadata.name for s in core.list_namespaced_secret(NS, label_selector="sel,tier!=gold").items] == ["s-b"]
    page = core.list_namespaced_secret(NS, label_selector="sel", limit=2)
    assert len(page.items) == 2 and page.metadata._continue
    rest = core.list_namespaced_secret(NS, label_selector="sel", limit=2, _continue=page.metadata._continue)
    assert [s.metadata.name for s in rest.items] == ["s-c"]


def test_watch_from_a_resource_version_replays_only_later_events(client: kubernetes.client.ApiClient) -> None:
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespaced_config_map(NS, {"metadata": {"name": "w-before", "labels": {"w": "1"}}})
    rv = core.list_namespaced_config_map(NS, label_selector="w=1").metadata.resource_version
    core.create_namespaced_config_map(NS, {"metadata": {"name": "w-after", "labels": {"w": "1"}}})
    core.patch_namespaced_config_map("w-after", NS, {"data": {"k": "v"}})
    core.delete_namespaced_config_map("w-before", NS)
    seen: list[tuple[str, str]] = []
    for event in kubernetes.watch.Watch().stream(
        core.list_namespaced_config_map, NS, label_selector="w=1", resource_version=rv, timeout_seconds=10
    ):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 3:
            break
    assert seen == [("ADDED", "w-after"), ("MODIFIED", "w-after"), ("DELETED", "w-before")]


def test_live_watch_sees_objects_leave_the_selection(client: kubernetes.client.ApiClient) -> None:
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespaced_config_map(NS, {"metadata": {"name": "lw", "labels": {"lw": "in"}}})
    rv = core.list_namespaced_config_map(NS).metadata.resource_version
    seen: list[tuple[str, str]] = []

    def watch() -> None:
        for event in kubernetes.watch.Watch().stream(
            core.list_namespaced_config_map, NS, label_selector="lw=in", resource_version=rv, timeout_seconds=3
        ):
            seen.append((event["type"], event["object"].metadata.name))
            if len(seen) == 2:
                return

    thread = threading.Thread(target=watch)
    thread.start()
    time.sleep(0.2)
    core.patch_namespaced_config_map("lw", NS, {"data": {"a": "1"}})
    core.patch_namespaced_config_map("lw", NS, {"metadata": {"labels": {"lw": "out"}}})
    thread.join(5)
    assert seen == [("MODIFIED", "lw"), ("DELETED", "lw")]


def test_finalizers_hold_deletion_and_owner_deletion_collects_dependents(client: kubernetes.client.ApiClient) -> None:
    core = kubernetes.client.CoreV1Api(client)
    owner = core.create_namespaced_config_map(NS, {"metadata": {"name": "owner", "finalizers": ["test/hold"]}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid, "controller": True}
    core.create_namespaced_secret(NS, {"metadata": {"name": "dep", "ownerReferences": [ref]}})
    core.delete_namespaced_config_map("owner", NS)
    held = core.read_namespaced_config_map("owner", NS)
    assert held.metadata.deletion_timestamp is not None
    assert core.read_namespaced_secret("dep", NS)  # the owner still exists
    with pytest.raises(ApiException) as e:  # no new finalizers while deleting
        core.patch_namespaced_config_map("owner", NS, {"metadata": {"finalizers": ["test/hold", "test/other"]}})
    assert e.value.status == 422
    core.patch_namespaced_config_map("owner", NS, {"metadata": {"finalizers": None}})

    def gone(read: Callable[[], Any]) -> bool:
        try:
            read()
        except ApiException as e:
            return e.status == 404
        return False

    _wait(lambda: gone(lambda: core.read_namespaced_config_map("owner", NS)))
    _wait(lambda: gone(lambda: core.read_namespaced_secret("dep", NS)))


def test_stale_delete_precondition_conflicts(client: kubernetes.client.ApiClient) -> None:
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespaced_config_map(NS, {"metadata": {"name": "pre"}})
    with pytest.raises(ApiException) as e:
        core.delete_namespaced_config_map("pre", NS, body={"preconditions": {"uid": "not-this-one"}})
    assert e.value.status == 409


def test_virt_controller_runs_a_vm_and_pause_hits_the_subresource(
    api: EmulatorThread, client: kubernetes.client.ApiClient
) -> None:
    co = kubernetes.client.CustomObjectsApi(client)
    vm = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm-1"},
        "spec": {
            "runStrategy": "Always",
            "template": {"metadata": {"labels": {"x": "y"}}, "spec": {"domain": {"devices": {}}}},
        },
    }
    co.create_namespaced_custom_object("kubevirt.io", "v1", NS, "virtualmachines", vm)

    def vmi() -> dict[str, Any]:
        return co.get_namespaced_custom_object("kubevirt.io", "v1", NS, "virtualmachineinstances", "vm-1")

    def running() -> dict[str, Any] | None:
        try:
            obj = vmi()
        except ApiException:
            return None
        return obj if obj.get("status", {}).get("phase") == "Running" else None

    obj = _wait(running)
    assert obj["status"]["interfaces"][0]["ipAddress"].startswith("127.")
    assert obj["metadata"]["ownerReferences"][0]["name"] == "vm-1"
    assert obj["metadata"]["labels"]["x"] == "y"
    path = f"/apis/subresources.kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/vm-1/"
    _raw(client, "PUT", path + "pause", {})
    assert any(c["type"] == "Paused" and c["status"] == "True" for c in vmi()["status"]["conditions"])
    with pytest.raises(ApiException) as e:
        _raw(client, "PUT", path + "pause", {})
    assert e.value.status == 409
    _raw(client, "PUT", path + "unpause", {})
    assert not any(c["type"] == "Paused" for c in vmi()["status"]["conditions"])
    calls = api.call(lambda em: list(em.subresource_calls))
    assert [c[2] for c in calls if c[4] == "vm-1"] == ["pause", "pause", "unpause"]
    # Deleting the VM takes its VMI with it (finalizers of virt-controller, then garbage collection).
    co.delete_namespaced_custom_object("kubevirt.io", "v1", NS, "virtualmachines", "vm-1")

    def both_gone() -> bool:
        names = api.call(lambda em: [k for k in em.objects if k[2] == "vm-1" and k[0].startswith("kubevirt.io")])
        return not names

    _wait(both_gone)


def test_emulator_runs_as_a_process(tmp_path: Path) -> None:
    from cyberdesk_stack import processes

    port = processes.free_port()
    kubeconfig = tmp_path / "kubeconfig"
    proc = processes.spawn(
        [__import__("sys").executable, "-m", "kube_emulator", "--port", str(port), "--kubeconfig", str(kubeconfig)],
        None,
        tmp_path / "emulator.log",
    )
    try:
        _wait(lambda: "listening" in (tmp_path / "emulator.log").read_text(), timeout=20)
        client = kubernetes.config.new_client_from_config(str(kubeconfig))
        core = kubernetes.client.CoreV1Api(client)
        assert [n.metadata.name for n in core.list_namespace().items] == ["default", "kube-system"]
    finally:
        processes.stop(proc)
