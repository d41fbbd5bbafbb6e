"""Checks of the Kubernetes manifests in k8s/ without a cluster.

Every object is checked field by field against the typed OpenAPI models of the `kubernetes` Python
client (an unknown or misspelt field fails, as does a wrong type or a missing required field), then
against the code it deploys: Service selectors and ports against the pods, probe ports against the
containers, the CYBERDESK_* variables each service reads against what its container sets, the
listen addresses against the container ports, and the NetworkPolicies by evaluating them for
pairs of pods. No Kubernetes API server is involved.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BASE = K8S / "base"
SECRETS = K8S / "secrets"
NAMESPACE = "cyberdesk"
IMAGE = "ghcr.io/cyberdesk/cyberdesk:dev"
SECRET_NAME = "cyberdesk-secrets"
COMPONENT = "app.kubernetes.io/component"
# Pod labels that NetworkPolicies may name although no manifest here creates such pods yet: the
# instance operator's instance_svc and the guest-agent VMs (a later issue, k8s/README.md).
FUTURE_COMPONENTS = {"instance-svc", "guest-agent"}

Obj = dict[str, Any]


@dataclass(frozen=True)
class Doc:
    """One YAML document of one file under k8s/."""

    path: Path
    obj: Obj

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.kind}/{self.obj.get('metadata', {}).get('name')}"


def _load() -> list[Doc]:
    docs: list[Doc] = []
    for path in sorted(K8S.rglob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj is None:
                continue
            assert isinstance(obj, dict), f"{path}: a document is not a mapping"
            docs.append(Doc(path, obj))
    return docs


DOCS = _load()
OBJECTS = [d for d in DOCS if d.kind != "Kustomization"]
BASE_OBJECTS = [d for d in OBJECTS if d.path.parent == BASE]


def _of_kind(*kinds: str) -> list[Doc]:
    return [d for d in BASE_OBJECTS if d.kind in kinds]


def _one(kind: str, name: str) -> Obj:
    found = [d.obj for d in BASE_OBJECTS if d.kind == kind and d.name == name]
    assert len(found) == 1, f"expected one {kind}/{name} in k8s/base, found {len(found)}"
    return found[0]


WORKLOADS = _of_kind("Deployment", "StatefulSet")


def _pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def _pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


# --- the OpenAPI models ---------------------------------------------------------------------------


def _model_name(obj: Obj) -> str:
    group_version: str = obj["apiVersion"]
    version = group_version.rsplit("/", 1)[-1]
    return f"{version[0].upper()}{version[1:]}{obj['kind']}"


def _strict(value: Any, type_name: str, where: str, errors: list[str]) -> None:
    """Walk `value` along the client's model `type_name`; unknown fields and wrong types go to `errors`."""
    # The client spells containers `List[X]` / `Dict[str, X]` (older releases: `list[X]` / `dict(str, X)`).
    if (listed := re.fullmatch(r"[Ll]ist\[(.+)\]", type_name)) is not None:
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _strict(item, listed.group(1), f"{where}[{i}]", errors)
        return
    if (mapped := re.fullmatch(r"(?:Dict\[[^,]+, (.+)\]|dict\([^,]+, (.+)\))", type_name)) is not None:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {type(value).__name__}")
            return
        for key, item in value.items():
            _strict(item, mapped.group(1) or mapped.group(2), f"{where}.{key}", errors)
        return
    primitive: dict[str, tuple[type, ...]] = {
        "str": (str,),
        "int": (int,),
        "float": (int, float),
        "bool": (bool,),
        "datetime": (str,),
        "date": (str,),
    }
    if type_name == "object":  # IntOrString and free-form fields
        return
    if type_name in primitive:
        ok = isinstance(value, primitive[type_name]) and not (type_name == "int" and isinstance(value, bool))
        if not ok:
            errors.append(f"{where}: expected {type_name}, got {value!r}")
        return
    model = getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        errors.append(f"{where}: expected a {type_name} mapping, got {value!r}")
        return
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json:
            errors.append(f"{where}: unknown field {key!r} of {type_name}")
            continue
        _strict(item, model.openapi_types[by_json[key]], f"{where}.{key}", errors)


@pytest.fixture(scope="module")
def api_client() -> Iterator[kubernetes.client.ApiClient]:
    client = kubernetes.client.ApiClient()
    yield client
    client.close()


def test_manifests_exist() -> None:
    kinds = {d.kind for d in BASE_OBJECTS}
    assert {"Namespace", "ConfigMap", "Deployment", "StatefulSet", "Service"} <= kinds
    assert {"HorizontalPodAutoscaler", "NetworkPolicy", "ServiceAccount"} <= kinds


@pytest.mark.parametrize("doc", OBJECTS, ids=str)
def test_object_matches_openapi_model(doc: Doc, api_client: kubernetes.client.ApiClient) -> None:
    model = _model_name(doc.obj)
    assert hasattr(kubernetes.client, model), f"{doc}: {doc.obj['apiVersion']} {doc.kind} has no model {model}"
    errors: list[str] = []
    _strict(doc.obj, model, str(doc), errors)
    assert not errors, "\n".join(errors)
    # The client's own deserializer: required fields and the models' value checks.
    typed = api_client.deserialize(json.dumps(doc.obj), model, None)
    assert typed.kind == doc.kind
    assert typed.metadata.name


def test_checks_reject_what_kubernetes_would(api_client: kubernetes.client.ApiClient) -> None:
    """The checker itself: a misspelt field, a wrong type and a missing required field are reported."""
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x", "lables": {}},
        "spec": {"ports": [{"port": "80"}], "selectr": {}},
    }
    errors: list[str] = []
    _strict(bad, "V1Service", "bad", errors)
    assert any("'lables'" in e for e in errors)
    assert any("'selectr'" in e for e in errors)
    assert any("ports[0].port: expected int" in e for e in errors)
    nameless = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "template": {"spec": {"containers": [{"image": IMAGE}]}}},
    }
    with pytest.raises(ValueError, match="name"):
        api_client.deserialize(json.dumps(nameless), "V1Deployment", None)


def test_namespaced_objects_are_in_the_namespace() -> None:
    for doc in OBJECTS:
        if doc.kind == "Namespace":
            assert doc.name == NAMESPACE
        else:
            assert doc.obj["metadata"].get("namespace") == NAMESPACE, f"{doc}: namespace is not {NAMESPACE}"


# --- kustomize ------------------------------------------------------------------------------------


def test_kustomization_lists_every_file() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE
    listed = list(kustomization["resources"])
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk, f"not listed: {on_disk - set(listed)}; missing: {set(listed) - on_disk}"
    # The Namespace must come before anything placed in it.
    assert listed[0] == "namespace.yaml"
    image = kustomization["images"][0]
    assert f"{image['name']}:{image['newTag']}" == IMAGE


def test_secret_kustomization_generates_the_secret_the_pods_use() -> None:
    kustomization = yaml.safe_load((SECRETS / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE
    # The Deployments name the Secret literally: a hash suffix would leave them pointing at nothing.
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    (generator,) = kustomization["secretGenerator"]
    assert generator["name"] == SECRET_NAME
    assert generator["envs"] == ["secrets.env"]
    assert (SECRETS / ".gitignore").read_text().split() == ["secrets.env"]


# --- secrets --------------------------------------------------------------------------------------


def _example_secret_keys() -> set[str]:
    keys = set()
    for line in (SECRETS / "secrets.env.example").read_text().splitlines():
        found = re.fullmatch(r"#\s*([a-z0-9-]+)=(.*)", line.strip())
        if found:
            assert found.group(2) == "", f"secrets.env.example holds a value for {found.group(1)}"
            keys.add(found.group(1))
        else:
            assert not re.match(r"\s*[A-Za-z0-9_-]+=", line), f"secrets.env.example: uncommented entry {line!r}"
    return keys


def test_no_secret_is_committed() -> None:
    for doc in DOCS:
        if doc.kind == "Secret":
            assert not doc.obj.get("data") and not doc.obj.get("stringData"), f"{doc} commits secret data"
    tracked = subprocess.run(
        ["git", "ls-files", "k8s"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "k8s/secrets/secrets.env" not in tracked
    assert not [p for p in tracked if p.endswith((".pem", ".key", ".crt"))]
    assert _example_secret_keys()


def test_every_secret_reference_names_a_documented_key() -> None:
    documented = _example_secret_keys()
    readme = (K8S / "README.md").read_text()
    used: set[str] = set()
    for workload in WORKLOADS:
        for container in _pod_spec(workload.obj)["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET_NAME, f"{workload}: Secret {ref['name']} is not documented"
                    assert not ref.get("optional"), f"{workload}: {env['name']} must not start without its secret"
                    used.add(ref["key"])
    assert used == documented
    for key in used:
        assert f"--from-literal={key}=" in readme, f"k8s/README.md does not show how to set {key}"


# --- services, workloads, probes ------------------------------------------------------------------


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_workload_selectors_match_their_pod_templates() -> None:
    for workload in WORKLOADS:
        selector = workload.obj["spec"]["selector"]
        assert set(selector) == {"matchLabels"}, f"{workload}: use matchLabels only"
        assert _selects(selector["matchLabels"], _pod_labels(workload.obj)), f"{workload}: selector misses its pods"


def test_every_service_selects_a_workload_and_its_ports() -> None:
    for service in _of_kind("Service"):
        selector = service.obj["spec"]["selector"]
        assert selector, f"{service}: no selector"
        targets = [w for w in WORKLOADS if _selects(selector, _pod_labels(w.obj))]
        assert len(targets) == 1, f"{service}: selects {len(targets)} workloads"
        ports = {p["name"]: p["containerPort"] for c in _pod_spec(targets[0].obj)["containers"] for p in c["ports"]}
        for port in service.obj["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), f"{service}: no container port {target}"


def _probe_port(probe: Obj) -> int | str:
    for kind in ("grpc", "httpGet", "tcpSocket"):
        if kind in probe:
            port: int | str = probe[kind]["port"]
            return port
    raise AssertionError(f"probe without a port: {probe}")


def test_every_probe_port_is_a_container_port() -> None:
    for workload in WORKLOADS:
        for container in _pod_spec(workload.obj)["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None or "exec" in probe:
                    continue
                port = _probe_port(probe)
                assert port in ports or port in ports.values(), f"{workload}: {kind} port {port} is not exposed"


def test_python_services_are_probed_over_grpc_health() -> None:
    """Every service serves grpc.health.v1 on its gRPC port; the kubelet asks it before routing traffic."""
    for workload in WORKLOADS:
        for container in _pod_spec(workload.obj)["containers"]:
            if container["image"] != IMAGE:
                continue
            grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
            assert container["readinessProbe"]["grpc"]["port"] == grpc_port, f"{workload}: readiness is not gRPC"
            assert container["startupProbe"]["grpc"]["port"] == grpc_port, f"{workload}: start-up is not gRPC"
            assert "livenessProbe" in container


# --- configuration against the code ---------------------------------------------------------------

_ENV_FUNCS = {"env_str", "env_int", "env_float", "env_bool"}


@dataclass
class EnvRead:
    """One CYBERDESK_<name> the code reads, and whether its default works in a cluster."""

    name: str
    literal_default: Any  # None when the default is not a constant (or there is none)
    where: str


@functools.cache
def _reads(package: str) -> list[EnvRead]:
    """The CYBERDESK_* variables read by `package` and by the shared code it runs."""
    files = sorted((ROOT / package).rglob("*.py"))
    files += [p for p in sorted((ROOT / "cyberdesk_common").glob("*.py")) if p.name != "config.py"]
    reads: list[EnvRead] = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if node.func.id in _ENV_FUNCS and node.args and isinstance(node.args[0], ast.Constant):
                default = node.args[1] if len(node.args) > 1 else None
                literal = default.value if isinstance(default, ast.Constant) else None
                reads.append(EnvRead(str(node.args[0].value), literal, where))
            # config.py's helpers that read a variable of their own.
            elif node.func.id == "state_dir":
                reads.append(EnvRead("STATE_DIR", None, where))
            elif node.func.id == "internal_token":
                reads.append(EnvRead("INTERNAL_TOKEN", None, where))
            elif node.func.id == "platform_redis_url":
                reads.append(EnvRead("REDIS_URL", None, where))
    return reads


def _must_set(read: EnvRead) -> bool:
    # No constant default; a loopback address (unreachable from another pod and from the kubelet);
    # STATE_DIR (the default is under $HOME on a read-only root); INTERNAL_TOKEN (the default is a
    # file created per pod, so replicas would disagree with each other and with instance_svc).
    if read.literal_default is None:
        return True
    return isinstance(read.literal_default, str) and "127.0.0.1" in read.literal_default


def _container_env(workload: Obj) -> tuple[Obj, dict[str, str | None]]:
    """The platform container of `workload` and its environment (None for a value from a Secret)."""
    (container,) = _pod_spec(workload)["containers"]
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        data = _one("ConfigMap", source["configMapRef"]["name"])["data"]
        env.update(data)
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return container, env


def _service_workloads() -> Iterator[tuple[Doc, str]]:
    for workload in WORKLOADS:
        command = _pod_spec(workload.obj)["containers"][0].get("command", [])
        if command[:2] == ["python", "-m"]:
            yield workload, command[2]


def test_each_platform_workload_runs_a_module_of_the_project() -> None:
    modules = {module for _, module in _service_workloads()}
    assert modules == {"gateway_svc", "billing_svc"}
    for module in modules:
        assert (ROOT / module / "__main__.py").is_file()


def test_every_variable_a_service_needs_in_a_cluster_is_set() -> None:
    for workload, package in _service_workloads():
        _, env = _container_env(workload.obj)
        for read in _reads(package):
            if _must_set(read):
                assert f"CYBERDESK_{read.name}" in env, f"{workload}: CYBERDESK_{read.name} ({read.where}) is not set"


def test_every_variable_set_is_read_by_the_code() -> None:
    """No dead setting: a misspelt CYBERDESK_* name would otherwise silently fall back to its default."""
    for workload, package in _service_workloads():
        (container,) = _pod_spec(workload.obj)["containers"]
        read = {f"CYBERDESK_{r.name}" for r in _reads(package)}
        for item in container.get("env", []):
            if item["name"].startswith("CYBERDESK_"):
                assert item["name"] in read, f"{workload}: {item['name']} is set but {package} never reads it"
    # The shared ConfigMap: each entry is read by at least one of the services that load it.
    all_read = {f"CYBERDESK_{r.name}" for _, package in _service_workloads() for r in _reads(package)}
    for configmap in _of_kind("ConfigMap"):
        for name in configmap.obj["data"]:
            assert name in all_read, f"{configmap}: {name} is read by no deployed service"


def test_gateway_verifies_keys_with_unkey() -> None:
    """Replicas must share one key backend: the local SQLite store would be a different one per pod."""
    _, env = _container_env(_one("Deployment", "gateway"))
    assert "CYBERDESK_UNKEY_ROOT_KEY" in env and "CYBERDESK_UNKEY_API_ID" in env
    assert {r.name for r in _reads("gateway_svc")} >= {"UNKEY_ROOT_KEY", "UNKEY_API_ID"}


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1].rsplit("/", 1)[0])


def test_listen_addresses_are_the_container_ports() -> None:
    expected = {
        "gateway": {"CYBERDESK_GATEWAY_ADDR": "grpc", "CYBERDESK_GATEWAY_HTTP_ADDR": "http"},
        "billing": {"CYBERDESK_BILLING_ADDR": "grpc"},
    }
    for name, addresses in expected.items():
        container, env = _container_env(_one("Deployment", name))
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for variable, port_name in addresses.items():
            value = env[variable]
            assert value is not None and value.startswith("0.0.0.0:"), f"{variable}={value} is not reachable"
            assert _port_of(value) == ports[port_name], f"{variable}={value} but port {port_name} is {ports[port_name]}"


def _redis_urls() -> Iterator[tuple[Doc, list[Obj], str, str]]:
    """(workload, its container's env list, variable, value) of every Redis URL a workload is given."""
    for workload in WORKLOADS:
        for container in _pod_spec(workload.obj)["containers"]:
            for item in container.get("env", []):
                if str(item.get("value", "")).startswith(("redis://", "rediss://")):
                    yield workload, container["env"], item["name"], item["value"]


def test_no_configmap_carries_a_redis_url() -> None:
    """A Redis URL carries the password: a ConfigMap is readable by anyone who may read the namespace's config."""
    for configmap in _of_kind("ConfigMap"):
        for name, value in configmap.obj["data"].items():
            assert "REDIS_URL" not in name and not str(value).startswith("redis"), f"{configmap}: {name}"


def test_every_redis_url_is_the_redis_service_with_the_secrets_password() -> None:
    service = _one("Service", "redis")
    urls = list(_redis_urls())
    assert {w.name for w, *_ in urls} >= {"gateway"}  # the gateway's rate limits and route cache
    for workload, env, name, url in urls:
        assert name in ("CYBERDESK_REDIS_URL", "REDIS_URL"), f"{workload}: {name} is read by no service"
        found = re.fullmatch(r"redis://:\$\((\w+)\)@([^:/]+):(\d+)/0", url)
        assert found, f"{workload}: {name}={url} does not take its password from a variable"
        variable, host, port = found.groups()
        assert host in ("redis", f"redis.{NAMESPACE}.svc", f"redis.{NAMESPACE}.svc.cluster.local")
        assert int(port) == service["spec"]["ports"][0]["port"]
        # Kubernetes expands $(VAR) only from entries listed before it in the same container.
        names = [item["name"] for item in env]
        assert variable in names[: names.index(name)], f"{workload}: $({variable}) is not defined before {name}"
        source = env[names.index(variable)]["valueFrom"]["secretKeyRef"]
        assert (source["name"], source["key"]) == (SECRET_NAME, "redis-password"), f"{workload}: {variable}"


def _redis_container() -> Obj:
    container: Obj
    (container,) = _pod_spec(_one("StatefulSet", "redis"))["containers"]
    return container


def test_redis_requires_the_secrets_password_and_its_probe_sends_it() -> None:
    container = _redis_container()
    env = {item["name"]: item.get("valueFrom", {}).get("secretKeyRef") for item in container["env"]}
    assert env["REDIS_PASSWORD"] == {"name": SECRET_NAME, "key": "redis-password"}
    assert env["REDISCLI_AUTH"] == {"name": SECRET_NAME, "key": "redis-password"}  # `redis-cli ping`
    argv = [*container["command"], *container["args"]]
    # Never on the command line, neither literally nor through Kubernetes' $(VAR) expansion.
    assert "--requirepass" not in argv and not any("$(REDIS_PASSWORD)" in part for part in argv)
    assert "requirepass" in container["command"][2] and "redis-server -" in container["command"][2]


def test_the_redis_start_command_refuses_clients_without_the_password(tmp_path: Path) -> None:
    """The manifest's own command and args, run here against the real redis-server (data dir and port swapped)."""
    import os
    import secrets
    import shutil
    import socket
    import time

    import redis

    from cyberdesk_stack.processes import free_port, stop

    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed: run `make setup`"
    container = _redis_container()
    command = [part.replace("exec redis-server", f"exec {binary}") for part in container["command"]]
    args = list(container["args"])
    args[args.index("--dir") + 1] = str(tmp_path)
    port, password = free_port(), secrets.token_urlsafe(24)
    argv = [*command, *args, "--port", str(port), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(argv, env={**os.environ, "REDIS_PASSWORD": password}, stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(100).startswith(b"-NOAUTH")
        for pid in [p.name for p in Path("/proc").iterdir() if p.name.isdigit()]:
            try:
                assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), f"pid {pid}"
            except OSError:
                continue  # ended meanwhile
        client.close()
    finally:
        stop(proc)


# --- redis, autoscaling ---------------------------------------------------------------------------


def test_redis_persists_its_data() -> None:
    redis = _one("StatefulSet", "redis")
    (container,) = _pod_spec(redis)["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[data_dir] == claim["metadata"]["name"]
    assert redis["spec"]["serviceName"] == "redis"
    assert _one("Service", "redis")["spec"]["clusterIP"] == "None"


def test_hpa_scales_the_gateway_on_cpu() -> None:
    hpa = _one("HorizontalPodAutoscaler", "gateway")["spec"]
    target = hpa["scaleTargetRef"]
    deployment = _one(target["kind"], target["name"])
    # The autoscaler owns the replica count; a `replicas` field would be reset on every apply.
    assert "replicas" not in deployment["spec"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    (container,) = _pod_spec(deployment)["containers"]
    assert "cpu" in container["resources"]["requests"], "CPU utilisation is relative to the request"


# --- security -------------------------------------------------------------------------------------


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    namespace = _one("Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in WORKLOADS:
        pod = _pod_spec(workload.obj)
        assert pod["securityContext"]["runAsNonRoot"] is True, workload
        assert pod["securityContext"]["runAsUser"] > 0, workload
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", workload
        assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod, workload
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, workload
            assert context["capabilities"] == {"drop": ["ALL"]}, workload
            assert context["readOnlyRootFilesystem"] is True, workload
            assert "privileged" not in context, workload
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{workload}: {kind}"
            assert not container["image"].endswith(":latest"), workload


def test_no_pod_can_reach_the_kubernetes_api() -> None:
    accounts = {d.name: d.obj for d in _of_kind("ServiceAccount")}
    for workload in WORKLOADS:
        pod = _pod_spec(workload.obj)
        account = accounts[pod["serviceAccountName"]]
        assert account["automountServiceAccountToken"] is False, workload
        assert pod["automountServiceAccountToken"] is False, workload
    assert len({_pod_spec(w.obj)["serviceAccountName"] for w in WORKLOADS}) == len(WORKLOADS), "shared account"
    assert not _of_kind("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


def test_platform_containers_use_the_project_image() -> None:
    images = {c["image"] for w in WORKLOADS for c in _pod_spec(w.obj)["containers"]}
    assert IMAGE in images
    # The Containerfile copies every package that the two distributions install, and installs both.
    containerfile = (K8S / "Containerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) ", containerfile, re.MULTILINE))
    for project in (ROOT / "pyproject.toml", ROOT / "sdk" / "python" / "pyproject.toml"):
        include = tomllib.loads(project.read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
        for pattern in include:
            top = pattern.rstrip("*").rstrip(".")
            assert top in copied, f"k8s/Containerfile does not copy {top} (from {project.relative_to(ROOT)})"
    assert "sdk/python" in copied and re.search(r"^RUN pip install \./sdk/python \. ", containerfile, re.MULTILINE)


# --- network policies -----------------------------------------------------------------------------


def _label_match(selector: Obj, labels: dict[str, str]) -> bool:
    if not _selects(selector.get("matchLabels", {}), labels):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _ingress_allowed(src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    """Whether the base's NetworkPolicies let a pod labelled `src` open `port` on a pod labelled `dst`.

    Both pods in the namespace; ports are numbers (the policies here name none).
    """
    policies = [p.obj["spec"] for p in _of_kind("NetworkPolicy")]
    selecting = [p for p in policies if "Ingress" in p["policyTypes"] and _label_match(p["podSelector"], dst)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy.get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p["port"] == port for p in ports):
                continue
            peers = rule.get("from")
            if peers is None or any("podSelector" in peer and _label_match(peer["podSelector"], src) for peer in peers):
                return True
    return False


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "cyberdesk", COMPONENT: component, "app.kubernetes.io/part-of": "cyberdesk"}


def test_network_policy_selectors_name_real_pods() -> None:
    deployed = {_pod_labels(w.obj)[COMPONENT] for w in WORKLOADS}
    known = deployed | FUTURE_COMPONENTS

    def components(selector: Obj) -> set[str]:
        named = {selector.get("matchLabels", {}).get(COMPONENT)} - {None}
        for expr in selector.get("matchExpressions", []):
            if expr["key"] == COMPONENT:
                named |= set(expr["values"])
        return {str(c) for c in named}

    for policy in _of_kind("NetworkPolicy"):
        spec = policy.obj["spec"]
        selectors = [spec["podSelector"]] + [
            peer["podSelector"] for rule in spec.get("ingress", []) for peer in rule.get("from", [])
        ]
        for selector in selectors:
            assert components(selector) <= known, f"{policy}: selects no pod: {components(selector) - known}"
            if selector:
                matches = [c for c in known if _label_match(selector, _labels(c) if c in deployed else {COMPONENT: c})]
                assert matches, f"{policy}: selector {selector} matches no pod"
        for rule in spec.get("ingress", []):
            for port in rule.get("ports", []):
                assert isinstance(port["port"], int)


def test_nothing_is_reachable_unless_a_policy_allows_it() -> None:
    stranger = {"app": "something-else"}
    for workload in WORKLOADS:
        dst = _pod_labels(workload.obj)
        component = dst[COMPONENT]
        for container in _pod_spec(workload.obj)["containers"]:
            for port in container["ports"]:
                allowed = _ingress_allowed(stranger, dst, port["containerPort"])
                assert allowed == (component == "gateway"), f"{component}:{port['containerPort']} from any pod"


def test_gateway_is_open_on_its_two_ports_only() -> None:
    stranger = {"app": "something-else"}
    assert _ingress_allowed(stranger, _labels("gateway"), 50051)
    assert _ingress_allowed(stranger, _labels("gateway"), 8080)
    assert not _ingress_allowed(stranger, _labels("gateway"), 9090)
    rule = _one("NetworkPolicy", "gateway-ingress")["spec"]["ingress"][0]
    assert "from" not in rule, "the gateway is the public entry: any source, in or outside the cluster"


def test_redis_only_from_the_platform_services() -> None:
    redis = _labels("redis")
    for component in ("gateway", "instance-svc", "billing"):
        assert _ingress_allowed(_labels(component), redis, 6379), component
    for component in ("guest-agent", "redis"):
        assert not _ingress_allowed(_labels(component), redis, 6379), component
    assert not _ingress_allowed({"app": "something-else"}, redis, 6379)
    # Another application's pod that happens to use the same component name is not our gateway.
    assert not _ingress_allowed({COMPONENT: "gateway"}, redis, 6379)


def test_guest_agents_only_from_the_gateway_and_instance_svc() -> None:
    agent = {COMPONENT: "guest-agent", "cyberdesk.dev/instance": "i-1"}
    assert _ingress_allowed(_labels("gateway"), agent, 50052)
    # instance_svc binds a warm-pool agent to its instance (instance_svc/agent_client.py).
    assert _ingress_allowed(_labels("instance-svc"), agent, 50052)
    for component in ("billing", "redis"):
        assert not _ingress_allowed(_labels(component), agent, 50052), component
    # One tenant's VM cannot reach another's agent.
    assert not _ingress_allowed({COMPONENT: "guest-agent", "cyberdesk.dev/instance": "i-2"}, agent, 50052)


# --- what is not deployed -------------------------------------------------------------------------


def test_instance_svc_is_not_deployed_and_the_readme_says_why() -> None:
    for workload in WORKLOADS:
        for container in _pod_spec(workload.obj)["containers"]:
            assert "instance_svc" not in container.get("command", []), f"{workload} runs instance_svc"
    readme = (K8S / "README.md").read_text()
    assert "kubectl apply -k k8s/base" in readme
    assert "KubeVirt" in readme and "instance_svc" in readme
