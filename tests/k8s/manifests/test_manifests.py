"""Checks of the Kubernetes deploy in k8s/ without a cluster.

`kubectl kustomize k8s/` (Debian's kubectl, as `kubectl apply -k k8s/` would) renders the whole
deploy once per run; every object it gives is validated (built-in kinds with kubernetes-validate in
strict mode, our custom resources against their CRDs, tests/support/kube_schemas.py), then checked
against the code it deploys: Service selectors and ports against the pods, probe ports against the
containers, the CYBERDESK_* variables each service reads against what its container sets, the
listen addresses against the container ports, the RBAC rules against the API calls the code makes,
and the NetworkPolicies by evaluating them for pairs of pods. No Kubernetes API server is involved.
"""

from __future__ import annotations

import ast
import functools
import ipaddress
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from instance_svc.operator import contract
from tests.support import kube_schemas

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "k8s"
BASE = K8S / "base"
SECRETS = K8S / "secrets"
NAMESPACE = contract.DEFAULT_NAMESPACE
IMAGE = "ghcr.io/cyberdesk/cyberdesk:dev"
SECRET_NAME = "cyberdesk-secrets"
COMPONENT = contract.LABEL_COMPONENT

Obj = dict[str, Any]


@dataclass(frozen=True)
class Doc:
    """One object of the rendered deploy (or one YAML document of a file under k8s/)."""

    path: Path
    obj: Obj

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    def __str__(self) -> str:
        return f"{self.kind}/{self.obj.get('metadata', {}).get('name')}"


def _kubectl() -> str:
    found = shutil.which("kubectl")
    assert found, "kubectl is not installed: run `make setup` (Debian package kubernetes-client)"
    return found


@functools.cache
def _rendered() -> list[Doc]:
    proc = subprocess.run([_kubectl(), "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize k8s/ failed:\n{proc.stderr}"
    # Nothing to say but the deprecation of `bases` (k8s/kustomization.yaml says why it is used).
    said = [line for line in proc.stderr.splitlines() if line.strip() and "'bases' is deprecated" not in line]
    assert not said, "\n".join(said)
    return [Doc(K8S / "kustomization.yaml", obj) for obj in yaml.safe_load_all(proc.stdout) if obj]


def _files() -> list[Doc]:
    """Every YAML document of every file under k8s/ (the guest image's cloud-config excepted)."""
    docs: list[Doc] = []
    for path in sorted(K8S.rglob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj is None:
                continue
            assert isinstance(obj, dict), f"{path}: a document is not a mapping"
            docs.append(Doc(path, obj))
    return docs


OBJECTS = _rendered()
FILE_DOCS = _files()


def _of_kind(*kinds: str) -> list[Doc]:
    return [d for d in OBJECTS if d.kind in kinds]


def _one(kind: str, name: str) -> Obj:
    found = [d.obj for d in OBJECTS if d.kind == kind and d.name == name]
    assert len(found) == 1, f"expected one {kind}/{name} in the deploy, found {len(found)}"
    return found[0]


WORKLOADS = _of_kind("Deployment", "StatefulSet")
CRDS = {(d.obj["spec"]["group"], d.obj["spec"]["names"]["kind"]): d.obj for d in _of_kind("CustomResourceDefinition")}


def _pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def _pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


# --- schemas --------------------------------------------------------------------------------------


def test_the_deploy_has_every_part() -> None:
    kinds = {d.kind for d in OBJECTS}
    assert {"Namespace", "ConfigMap", "Deployment", "StatefulSet", "Service", "PodDisruptionBudget"} <= kinds
    assert {"HorizontalPodAutoscaler", "NetworkPolicy", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    assert {"CustomResourceDefinition", contract.TEMPLATE_KIND, contract.WARM_POOL_KIND} <= kinds
    crd_files = [d for d in FILE_DOCS if d.kind == "CustomResourceDefinition"]
    assert len(CRDS) == len(crd_files), "a CRD under k8s/crds is not in the deploy"


@pytest.mark.parametrize("doc", OBJECTS, ids=str)
def test_every_object_validates(doc: Doc) -> None:
    """Built-ins against Kubernetes' strict schemas, our custom resources against their CRDs."""
    kube_schemas.validate(doc.obj, CRDS)


def test_namespaced_objects_are_in_the_namespace() -> None:
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for doc in OBJECTS:
        if doc.kind == "Namespace":
            assert doc.name == NAMESPACE
        elif doc.kind in cluster_scoped:
            assert "namespace" not in doc.obj["metadata"], f"{doc} is cluster-scoped"
        else:
            assert doc.obj["metadata"].get("namespace") == NAMESPACE, f"{doc}: namespace is not {NAMESPACE}"


# --- kustomize ------------------------------------------------------------------------------------


def _kustomization(directory: Path) -> Obj:
    loaded: Obj = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return loaded


def test_kustomize_renders_the_whole_deploy() -> None:
    """`kubectl kustomize k8s/` renders every object of every file the kustomizations list, once."""
    top = _kustomization(K8S)
    assert top["bases"] == ["crds", "base", "templates"] and "resources" not in top
    names = [(d.kind, d.obj["metadata"].get("namespace"), d.name) for d in OBJECTS]
    assert len(names) == len(set(names)), "an object is rendered twice"
    listed = [
        (directory / name, doc)
        for directory in (K8S / "crds", BASE, K8S / "templates")
        for name in _kustomization(directory)["resources"]
        for doc in yaml.safe_load_all((directory / name).read_text())
        if doc
    ]
    rendered = {(d.kind, d.name) for d in OBJECTS}
    for path, doc in listed:
        assert (doc["kind"], doc["metadata"]["name"]) in rendered, f"{path}: {doc['kind']} {doc['metadata']['name']}"
    assert len(listed) == len(OBJECTS)


def test_kustomizations_list_every_file() -> None:
    for directory in (K8S / "crds", BASE, K8S / "templates"):
        kustomization = _kustomization(directory)
        listed = list(kustomization["resources"])
        assert len(listed) == len(set(listed)), f"{directory}: a resource is listed twice"
        on_disk = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        assert set(listed) == on_disk, (
            f"{directory}: not listed {on_disk - set(listed)}; missing {set(listed) - on_disk}"
        )
    base = _kustomization(BASE)
    assert base["namespace"] == NAMESPACE
    # The Namespace must come before anything placed in it.
    assert base["resources"][0] == "namespace.yaml"
    image = base["images"][0]
    assert f"{image['name']}:{image['newTag']}" == IMAGE
    # kustomize's images transformer treats every spec.template as a pod template; a
    # CyberdeskWarmPool's is a name, so the layer holding it must not have one.
    assert "images" not in _kustomization(K8S / "templates")


def test_secret_kustomization_generates_the_secret_the_pods_use() -> None:
    kustomization = yaml.safe_load((SECRETS / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE
    # The Deployments name the Secret literally: a hash suffix would leave them pointing at nothing.
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    (generator,) = kustomization["secretGenerator"]
    assert generator["name"] == SECRET_NAME
    assert generator["env"] == "secrets.env"
    assert (SECRETS / ".gitignore").read_text().split() == ["secrets.env"]


def test_the_secret_kustomization_renders_every_key(tmp_path: Path) -> None:
    """kubectl kustomize of k8s/secrets with every documented key filled in: the Secret the pods name."""
    shutil.copytree(SECRETS, tmp_path / "secrets")
    keys = sorted(_example_secret_keys())
    (tmp_path / "secrets" / "secrets.env").write_text("".join(f"{key}=value-of-{key}\n" for key in keys))
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(tmp_path / "secrets")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    (secret,) = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert (secret["kind"], secret["metadata"]["name"], secret["metadata"]["namespace"]) == (
        "Secret",
        SECRET_NAME,
        NAMESPACE,
    )
    assert sorted(secret["data"]) == keys
    kube_schemas.validate_builtin(secret)


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
    for doc in [*FILE_DOCS, *OBJECTS]:
        if doc.kind == "Secret":
            assert not doc.obj.get("data") and not doc.obj.get("stringData"), f"{doc} commits secret data"
    tracked = subprocess.run(
        ["git", "ls-files", "k8s"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "k8s/secrets/secrets.env" not in tracked
    assert not [p for p in tracked if p.endswith((".pem", ".key", ".crt"))]
    assert _example_secret_keys()


# Keys a deploy may leave out: billing_svc without Stripe meters into its ledger only and sends
# nothing (docs/billing.md, "Nothing leaves the machine without a key").
OPTIONAL_SECRET_KEYS = {"stripe-secret-key", "stripe-webhook-secret"}


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
                    if ref["key"] in OPTIONAL_SECRET_KEYS:
                        assert ref.get("optional") is True, f"{workload}: {env['name']} stops the pod without Stripe"
                    else:
                        assert not ref.get("optional"), f"{workload}: {env['name']} must not start without its secret"
                    used.add(ref["key"])
    assert used == documented
    assert used >= OPTIONAL_SECRET_KEYS
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
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
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
            grpc_ports = [p["containerPort"] for p in container.get("ports", []) if p["name"] == "grpc"]
            if not grpc_ports:
                # The operator serves no gRPC and no health endpoint: its peering keep-alive is its
                # liveness (operator.yaml).
                assert container["command"][2] == "instance_svc.operator", workload
                assert "livenessProbe" not in container and "readinessProbe" not in container, workload
                continue
            assert "livenessProbe" in container, workload
            (grpc_port,) = grpc_ports
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


# Where a module's code is not what it runs in the cluster: instance_svc runs the kubevirt runtime,
# so the local runtime's code (its own package) and the operator (a workload of its own) are not
# read for it.
_NOT_RUN = {"instance_svc": ("instance_svc/runtime/local", "instance_svc/operator")}
# Settings instance_svc reads only to build the local runtime (server.make_runtime's "local"
# branch, and the local warm pool: build_app), never with CYBERDESK_RUNTIME=kubevirt.
_LOCAL_RUNTIME_ONLY = {"EGRESS_ALLOW_RANGES", "EGRESS_DNS_UPSTREAM", "WARM_POOL"}


def _constant(node: ast.expr | None) -> Any:
    """The value of a constant expression (`"x"`, `2 * 3600.0`, `-1`), else None."""
    if node is None:
        return None
    allowed = (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop)
    if not all(isinstance(n, allowed) for n in ast.walk(node)):
        return None
    return eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})


def _module_constants(tree: ast.Module) -> dict[str, Any]:
    """The module's top-level `NAME = <constant>` assignments (a default given by such a name is that constant)."""
    found: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target, value = node.target.id, node.value
        else:
            continue
        constant = _constant(value)
        if constant is not None:
            found[target] = constant
    return found


@functools.cache
def _reads(module: str) -> list[EnvRead]:
    """The CYBERDESK_* variables read by `module` and by the shared code it runs."""
    package = module.replace(".", "/")
    files = [
        p
        for p in sorted((ROOT / package).rglob("*.py"))
        if not any(p.is_relative_to(ROOT / skip) for skip in _NOT_RUN.get(module, ()))
    ]
    files += [p for p in sorted((ROOT / "cyberdesk_common").glob("*.py")) if p.name != "config.py"]
    reads: list[EnvRead] = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        constants = _module_constants(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if node.func.id in _ENV_FUNCS and node.args and isinstance(node.args[0], ast.Constant):
                default = node.args[1] if len(node.args) > 1 else None
                # A module constant's name (DEFAULT_WEBHOOK_ADDR = "127.0.0.1:50072") counts as its value.
                literal = constants.get(default.id) if isinstance(default, ast.Name) else _constant(default)
                reads.append(EnvRead(str(node.args[0].value), literal, where))
            # config.py's helpers that read a variable of their own.
            elif node.func.id == "state_dir":
                reads.append(EnvRead("STATE_DIR", None, where))
            elif node.func.id == "internal_token":
                reads.append(EnvRead("INTERNAL_TOKEN", None, where))
            elif node.func.id == "platform_redis_url":
                reads.append(EnvRead("REDIS_URL", None, where))
    if module == "instance_svc":
        names = {r.name for r in reads}
        assert names >= _LOCAL_RUNTIME_ONLY, f"instance_svc no longer reads {_LOCAL_RUNTIME_ONLY - names}"
        reads = [r for r in reads if r.name not in _LOCAL_RUNTIME_ONLY]
    return reads


# Computed defaults that are right in a cluster, and why.
_COMPUTED_DEFAULT_IS_RIGHT = {
    # Random per operator replica: kopf's peering pauses every replica but the highest, and replicas
    # of equal priority would all pause.
    "OPERATOR_PRIORITY",
    # Stripe's meter event host, or STRIPE_API_BASE when that is moved (billing_svc/stripe_delivery.py).
    "STRIPE_METER_EVENTS_BASE",
}


def _must_set(read: EnvRead) -> bool:
    # No constant default; a loopback address (unreachable from another pod and from the kubelet);
    # STATE_DIR (the default is under $HOME on a read-only root); INTERNAL_TOKEN (the default is a
    # file created per pod, so replicas would disagree with each other and with instance_svc).
    if read.name in _COMPUTED_DEFAULT_IS_RIGHT:
        return False
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
    assert modules == {"gateway_svc", "billing_svc", "instance_svc", "instance_svc.operator"}
    for module in modules:
        assert (ROOT / module.replace(".", "/") / "__main__.py").is_file(), module


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


# Each Deployment's addresses: where it listens (variable -> its container port's name), and the
# other services it dials (variable -> that Service). The shared ConfigMap holds the Services'
# addresses; a pod overrides its own with a listen address.
LISTENS = {
    "gateway": {"CYBERDESK_GATEWAY_ADDR": "grpc", "CYBERDESK_GATEWAY_HTTP_ADDR": "http"},
    "billing": {"CYBERDESK_BILLING_ADDR": "grpc", "CYBERDESK_BILLING_WEBHOOK_ADDR": "webhook"},
    "instance-svc": {"CYBERDESK_INSTANCE_ADDR": "grpc"},
}
DIALS = {
    "gateway": {"CYBERDESK_INSTANCE_ADDR": "instance-svc", "CYBERDESK_BILLING_ADDR": "billing"},
    "billing": {"CYBERDESK_INSTANCE_ADDR": "instance-svc"},
    "instance-svc": {"CYBERDESK_BILLING_ADDR": "billing"},
}


def test_listen_addresses_are_the_container_ports() -> None:
    for name, addresses in LISTENS.items():
        container, env = _container_env(_one("Deployment", name))
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for variable, port_name in addresses.items():
            value = env[variable]
            assert value is not None and value.startswith("0.0.0.0:"), f"{variable}={value} is not reachable"
            assert _port_of(value) == ports[port_name], f"{variable}={value} but port {port_name} is {ports[port_name]}"


def test_dialled_addresses_are_the_services() -> None:
    """What a service dials is the other's Service and port, never a listen address like 0.0.0.0."""
    for name, targets in DIALS.items():
        _, env = _container_env(_one("Deployment", name))
        for variable, service_name in targets.items():
            value = env[variable]
            assert value is not None, f"{name}: {variable} comes from a Secret"
            host, port = value.rsplit(":", 1)
            assert host in (service_name, f"{service_name}.{NAMESPACE}.svc"), f"{name}: {variable}={value}"
            ports = {p["port"] for p in _one("Service", service_name)["spec"]["ports"]}
            assert int(port) in ports, f"{name}: {variable}={value}, Service {service_name} has {ports}"
    # Every *_ADDR a service reads is one of the two (a new one must be added above).
    for workload, package in _service_workloads():
        if package == "instance_svc.operator":
            continue
        read = {f"CYBERDESK_{r.name}" for r in _reads(package) if r.name.endswith("_ADDR")}
        component = _pod_labels(workload.obj)[COMPONENT]
        assert read == set(LISTENS[component]) | set(DIALS[component]), f"{workload}: {read}"


def test_instance_svc_asks_billing_and_fails_closed() -> None:
    """A create or SetInstanceTimeout is refused (UNAVAILABLE) while billing cannot answer, never let past a plan."""
    from instance_svc.billing import MODE_ENV, MODES

    _, env = _container_env(_one("Deployment", "instance-svc"))
    assert "closed" in MODES
    assert env.get(MODE_ENV) == "closed"


def test_billing_keeps_its_ledger_on_a_volume_with_one_writer() -> None:
    """The SQLite ledger: on a PersistentVolumeClaim, one replica, never two pods at once (Recreate)."""
    deployment = _one("Deployment", "billing")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container, env = _container_env(deployment)
    ledger = Path(env["CYBERDESK_BILLING_DB"] or "")
    assert ledger.is_absolute()
    pod = _pod_spec(deployment)
    volumes = pod["volumes"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
    (mount,) = [m for m in container["volumeMounts"] if ledger.is_relative_to(m["mountPath"])]
    assert mount["name"] in claims and not mount.get("readOnly"), "the ledger is not on the claim"
    claim = _one("PersistentVolumeClaim", claims[mount["name"]])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    # The non-root uid writes the volume through the pod's group.
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    # A fixed consumer name: a replacing pod reads what its predecessor left pending at once.
    assert env["CYBERDESK_BILLING_CONSUMER"]


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
    # The gateway's rate limits and route cache; instance_svc's lifecycle event outbox; billing's
    # consumer group on that stream.
    assert {w.name for w, *_ in urls} == {"gateway", "instance-svc", "billing"}
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
    import contextlib
    import os
    import secrets
    import shutil
    import signal
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
    # A session of its own, killed as a group at the end: whatever the command starts goes with it.
    proc = subprocess.Popen(
        argv, env={**os.environ, "REDIS_PASSWORD": password}, stdout=subprocess.DEVNULL, start_new_session=True
    )
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
        # The process the container starts (its PID 1) is redis-server itself, not a shell in front
        # of it: the kubelet's SIGTERM reaches redis-server, which exits cleanly, well within the
        # pod's grace period (a shell as PID 1 forwards nothing, and SIGKILL follows 30 s later).
        assert Path(f"/proc/{proc.pid}/exe").resolve() == Path(binary).resolve()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stop(proc)


# --- redis, replicas, autoscaling, disruption budgets ---------------------------------------------


def test_redis_persists_its_data() -> None:
    redis = _one("StatefulSet", "redis")
    (container,) = _pod_spec(redis)["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[data_dir] == claim["metadata"]["name"]
    assert redis["spec"]["serviceName"] == "redis"
    assert _one("Service", "redis")["spec"]["clusterIP"] == "None"


def test_hpa_scales_the_gateway_on_cpu_up_to_twenty() -> None:
    hpa = _one("HorizontalPodAutoscaler", "gateway")["spec"]
    target = hpa["scaleTargetRef"]
    deployment = _one(target["kind"], target["name"])
    # The autoscaler owns the replica count; a `replicas` field would be reset on every apply.
    assert "replicas" not in deployment["spec"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] >= 20
    (container,) = _pod_spec(deployment)["containers"]
    assert "cpu" in container["resources"]["requests"], "CPU utilisation is relative to the request"


def test_instance_svc_and_the_operator_run_several_replicas() -> None:
    assert _one("Deployment", "instance-svc")["spec"]["replicas"] >= 2
    # Two operators: kopf's peering lets one act; the standby takes over when it dies.
    assert _one("Deployment", "instance-operator")["spec"]["replicas"] == 2
    _, env = _container_env(_one("Deployment", "instance-svc"))
    assert env["CYBERDESK_RUNTIME"] == "kubevirt"


def test_every_replicated_workload_has_a_disruption_budget() -> None:
    budgets = _of_kind("PodDisruptionBudget")
    for workload in WORKLOADS:
        replicas = workload.obj["spec"].get("replicas")
        if replicas == 1:
            continue  # one pod: a budget would only block node drains
        labels = _pod_labels(workload.obj)
        covering = [b for b in budgets if _selects(b.obj["spec"]["selector"]["matchLabels"], labels)]
        assert len(covering) == 1, f"{workload}: {len(covering)} budgets"
        assert covering[0].obj["spec"] == {**covering[0].obj["spec"], "maxUnavailable": 1}, workload


# --- templates and warm pool against instance_svc -------------------------------------------------


def test_templates_are_the_ones_instance_svc_offers() -> None:
    from instance_svc.validation import TEMPLATE_DISK_MIB, TEMPLATES

    templates = {d.name: d.obj["spec"] for d in _of_kind(contract.TEMPLATE_KIND)}
    assert set(templates) == set(TEMPLATES)
    assert templates["desktop"]["desktop"] is True and templates["base"]["desktop"] is False
    for name, spec in templates.items():
        assert spec["defaults"]["diskMiB"] == TEMPLATE_DISK_MIB[name], name
        image = spec["source"]["containerDisk"]["image"]
        assert image.startswith("ghcr.io/cyberdesk/guest") and not image.endswith(":latest"), name


def test_the_warm_pool_is_claimable_by_instance_svc_defaults() -> None:
    """A CreateInstance with no resources is claimed from the pool only if the pool's resources equal its."""
    from cyberdesk_proto.v1 import instance_pb2
    from instance_svc.runtime.kubevirt import parse_warm_pools
    from instance_svc.validation import MachineLimits, validate_create

    _, env = _container_env(_one("Deployment", "instance-svc"))
    pools = {d.name: d.obj["spec"] for d in _of_kind(contract.WARM_POOL_KIND)}
    configured = parse_warm_pools(env["CYBERDESK_KUBE_WARM_POOLS"] or "")
    assert configured, "instance_svc claims from no pool"
    for template, pool in configured:
        spec = pools[pool]
        assert spec["template"] == template
        request = validate_create(instance_pb2.CreateInstanceRequest(template=template), MachineLimits(8, 16384, 65536))
        assert spec["resources"] == {
            "vcpu": request.vcpus,
            "memoryMiB": request.memory_mib,
            "diskMiB": request.disk_mib,
        }, f"pool {pool} holds VMs no default CreateInstance asks for"
        assert spec["size"] >= 1


# --- security -------------------------------------------------------------------------------------


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    labels = _one("Namespace", NAMESPACE)["metadata"]["labels"]
    # Enforced: privileged, for KubeVirt's launcher pods (namespace.yaml); every pod of ours is
    # restricted (below), and the API server warns and audits any pod that is not.
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert labels["pod-security.kubernetes.io/audit"] == "restricted"
    for workload in WORKLOADS:
        pod = _pod_spec(workload.obj)
        assert pod["securityContext"]["runAsNonRoot"] is True, workload
        assert pod["securityContext"]["runAsUser"] > 0, workload
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", workload
        assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod, workload
        assert not any("hostPath" in v for v in pod.get("volumes", [])), workload
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, workload
            assert context["capabilities"] == {"drop": ["ALL"]}, workload
            assert context["readOnlyRootFilesystem"] is True, workload
            assert "privileged" not in context, workload
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{workload}: {kind}"
            assert not container["image"].endswith(":latest"), workload


API_CLIENTS = {"instance-svc", "instance-operator"}


def test_only_instance_svc_and_the_operator_hold_an_api_token() -> None:
    accounts = {d.name: d.obj for d in _of_kind("ServiceAccount")}
    for workload in WORKLOADS:
        pod = _pod_spec(workload.obj)
        account = accounts[pod["serviceAccountName"]]
        assert account["automountServiceAccountToken"] is False, workload
        assert pod["automountServiceAccountToken"] is (pod["serviceAccountName"] in API_CLIENTS), workload
    assert len({_pod_spec(w.obj)["serviceAccountName"] for w in WORKLOADS}) == len(WORKLOADS), "shared account"
    bound = set()
    for binding in _of_kind("RoleBinding", "ClusterRoleBinding"):
        for subject in binding.obj["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE, binding
            bound.add(subject["name"])
    assert bound == API_CLIENTS


def _rules(account: str) -> list[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every rule bound to `account`."""
    roles = {(d.kind, d.name): d.obj for d in _of_kind("Role", "ClusterRole")}
    found = []
    for binding in _of_kind("RoleBinding", "ClusterRoleBinding"):
        if not any(s["name"] == account for s in binding.obj["subjects"]):
            continue
        role = roles[(binding.obj["roleRef"]["kind"], binding.obj["roleRef"]["name"])]
        for rule in role["rules"]:
            assert "resourceNames" not in rule or rule["resourceNames"], role
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        assert "*" not in (group, resource, verb), f"{role['metadata']['name']}: a wildcard"
                        found.append((group, resource, verb))
    return found


def test_no_account_may_make_pods_or_escalate() -> None:
    """What Pod Security would guard against (namespace.yaml): no workload here may create pods."""
    forbidden_resources = {
        "pods", "pods/exec", "pods/attach", "deployments", "replicasets", "statefulsets", "daemonsets",
        "jobs", "cronjobs", "replicationcontrollers", "roles", "rolebindings", "clusterroles",
        "clusterrolebindings", "serviceaccounts", "serviceaccounts/token", "nodes", "namespaces",
        "virtualmachineinstances", "persistentvolumes",
    }  # fmt: skip
    for account in API_CLIENTS:
        for _group, resource, verb in _rules(account):
            if resource in forbidden_resources:
                assert verb in ("get", "list", "watch"), f"{account} may {verb} {resource}"
            assert verb not in ("escalate", "bind", "impersonate"), f"{account} may {verb}"
        # Secrets are read by name only: a `list` or `watch` would hand over every Secret at once.
        assert not {("", "secrets", v) for v in ("list", "watch")} & set(_rules(account)), account


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


def test_the_gateway_serves_the_console_the_image_builds() -> None:
    """CYBERDESK_CONSOLE_DIR is where the Containerfile puts the console built as `make console` builds it."""
    containerfile = (K8S / "Containerfile").read_text()
    assert re.search(r"^RUN cd console && npm ci .*&& node build\.mjs$", containerfile, re.MULTILINE)
    (destination,) = re.findall(r"^COPY --from=console /src/console/dist (\S+)$", containerfile, re.MULTILINE)
    _, env = _container_env(_one("Deployment", "gateway"))
    assert env["CYBERDESK_CONSOLE_DIR"] == destination


# --- network policies -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod (its namespace's labels and its own) or an address outside."""

    ip: str
    labels: tuple[tuple[str, str], ...] = ()
    namespace: tuple[tuple[str, str], ...] | None = None  # None: not a pod

    @property
    def pod_labels(self) -> dict[str, str]:
        return dict(self.labels)


def _ns(name: str) -> tuple[tuple[str, str], ...]:
    return (("kubernetes.io/metadata.name", name),)


_PLATFORM_IPS = iter(f"10.244.0.{i}" for i in range(10, 250))


def _pod(component: str, namespace: str = NAMESPACE, **extra: str) -> Peer:
    labels = {"app.kubernetes.io/name": "cyberdesk", COMPONENT: component, **extra}
    return Peer(next(_PLATFORM_IPS), tuple(sorted(labels.items())), _ns(namespace))


def _vm(name: str) -> Peer:
    """A VM's launcher pod, labelled as the operator labels it (manifests.pod_labels)."""
    from instance_svc.operator import manifests

    labels = manifests.pod_labels(manifests.common_labels(name, instance=name, tenant="t1"))
    return Peer(next(_PLATFORM_IPS), tuple(sorted(labels.items())), _ns(NAMESPACE))


KUBE_DNS = Peer("10.244.9.2", (("k8s-app", "kube-dns"),), _ns("kube-system"))
STRANGER = Peer("10.244.7.7", (("app", "something-else"),), _ns("other"))
API_SERVER = Peer("172.18.0.2")  # a control-plane node's address, where the `kubernetes` Service leads
INTERNET = Peer("203.0.113.10")  # e.g. Unkey's API
METADATA = Peer("169.254.169.254")
PRIVATE = Peer("192.168.1.20")


def _matches(peer_rule: Obj, peer: Peer) -> bool:
    if "ipBlock" in peer_rule:
        block = peer_rule["ipBlock"]
        address = ipaddress.ip_address(peer.ip)
        if address not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(address in ipaddress.ip_network(e) for e in block.get("except", []))
    if peer.namespace is None:
        return False  # pod and namespace selectors select pods only
    if "namespaceSelector" in peer_rule:
        if not _label_match(peer_rule["namespaceSelector"], dict(peer.namespace)):
            return False
    elif dict(peer.namespace) != dict(_ns(NAMESPACE)):
        return False  # a podSelector alone selects in the policy's own namespace
    return "podSelector" not in peer_rule or _label_match(peer_rule["podSelector"], peer.pod_labels)


def _port_match(rule: Obj, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return ports is None or any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports)


def _side_allows(direction: str, subject: Peer, other: Peer, port: int, protocol: str, extra: list[Obj]) -> bool:
    """Whether the namespace's policies of `direction` ("Ingress"/"Egress") that select `subject` allow it."""
    if subject.namespace is None or dict(subject.namespace) != dict(_ns(NAMESPACE)):
        return True  # not ours to police
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    policies = [
        spec
        for spec in [*(p.obj["spec"] for p in _of_kind("NetworkPolicy")), *(e["spec"] for e in extra)]
        if direction in spec["policyTypes"] and _label_match(spec["podSelector"], subject.pod_labels)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy.get(key, []):
            if not _port_match(rule, port, protocol):
                continue
            peers = rule.get(peers_key)
            if peers is None or any(_matches(peer, other) for peer in peers):
                return True
    return False


def _allowed(src: Peer, dst: Peer, port: int, protocol: str = "TCP", extra: tuple[Obj, ...] = ()) -> bool:
    """Whether the deploy's NetworkPolicies (and `extra`) let `src` open `port` on `dst`: both sides must agree."""
    more = list(extra)
    return _side_allows("Egress", src, dst, port, protocol, more) and _side_allows(
        "Ingress", dst, src, port, protocol, more
    )


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


AGENT_PORT = contract.DEFAULT_AGENT_PORT
PLATFORM = ("gateway", "instance-svc", "instance-operator", "billing", "redis")
# Who may open which port on whom, and nothing else (networkpolicies.yaml's header).
EXPECTED = {
    ("gateway", "instance-svc", 50061),
    ("gateway", "billing", 50071),
    ("gateway", "redis", 6379),
    ("gateway", "guest-agent", AGENT_PORT),
    ("instance-svc", "billing", 50071),
    ("instance-svc", "redis", 6379),
    ("instance-svc", "guest-agent", AGENT_PORT),
    ("instance-operator", "guest-agent", AGENT_PORT),
    ("billing", "instance-svc", 50061),
    ("billing", "redis", 6379),
    # The public entry, from outside the namespace (a load balancer, an ingress controller, a client
    # pod). Nothing of ours calls it: our pods' egress does not allow it, nor does a VM's.
    ("stranger", "gateway", 50051),
    ("stranger", "gateway", 8080),
    # Stripe's webhooks into billing (through an ingress controller, or from Stripe itself); the
    # signature is their authentication. Again no pod of ours, and no VM, reaches it.
    ("stranger", "billing", 50072),
}


def _ports_of(component: str) -> set[int]:
    if component == "guest-agent":
        return {AGENT_PORT, 22, 8080}
    workload = next(w for w in WORKLOADS if _pod_labels(w.obj)[COMPONENT] == component)
    return {p["containerPort"] for c in _pod_spec(workload.obj)["containers"] for p in c.get("ports", [])} | {22}


def test_every_pod_reaches_exactly_what_it_needs() -> None:
    def peer(component: str) -> Peer:
        if component == "stranger":
            return STRANGER
        return _vm("i-0123456789ab") if component == "guest-agent" else _pod(component)

    sources = (*PLATFORM, "guest-agent", "stranger")
    for src in sources:
        for dst in (*PLATFORM, "guest-agent"):
            for port in _ports_of(dst):
                expected = (src, dst, port) in EXPECTED
                assert _allowed(peer(src), peer(dst), port) == expected, f"{src} -> {dst}:{port}"


def test_no_agent_reaches_another_agent_or_anything_else() -> None:
    one, other = _vm("i-000000000001"), _vm("i-000000000002")
    assert not _allowed(one, other, AGENT_PORT)
    # Without its own policy (network mode None) a VM reaches nothing at all, DNS included; what a
    # VM of mode Internet reaches is its per-VM policy's business (docs/kubernetes.md).
    for target, port in [(KUBE_DNS, 53), (API_SERVER, 443), (INTERNET, 443), (METADATA, 80), (PRIVATE, 22)]:
        assert not _allowed(one, target, port), f"VM -> {target.ip}:{port}"
    assert not _allowed(one, KUBE_DNS, 53, "UDP")


def test_outside_the_namespace() -> None:
    gateway, instance_svc, operator = _pod("gateway"), _pod("instance-svc"), _pod("instance-operator")
    billing, redis = _pod("billing"), _pod("redis")
    for pod in (gateway, instance_svc, operator, billing):
        assert _allowed(pod, KUBE_DNS, 53, "UDP") and _allowed(pod, KUBE_DNS, 53, "TCP")
        assert not _allowed(pod, METADATA, 80) and not _allowed(pod, METADATA, 443)
        assert not _allowed(pod, STRANGER, 8080)
    for target, port in [(KUBE_DNS, 53), (API_SERVER, 443), (INTERNET, 443)]:
        assert not _allowed(redis, target, port), f"redis -> {target.ip}:{port}"
    assert not _allowed(redis, KUBE_DNS, 53, "UDP")
    # The gateway (Unkey) and billing (Stripe): HTTPS outside, never a private, link-local or
    # metadata address, nor the API server, nor plain HTTP.
    for pod in (gateway, billing):
        name = pod.pod_labels[COMPONENT]
        assert _allowed(pod, INTERNET, 443), name
        assert not _allowed(pod, INTERNET, 80), name
        for target in (METADATA, PRIVATE, API_SERVER):
            assert not _allowed(pod, target, 443), f"{name} -> {target.ip}"
        assert not _allowed(pod, API_SERVER, 6443), name
    # The API clients reach the API server (on 443 or 6443), not the metadata service.
    for pod in (instance_svc, operator):
        assert _allowed(pod, API_SERVER, 443) and _allowed(pod, API_SERVER, 6443)
        assert not _allowed(pod, METADATA, 80) and not _allowed(pod, PRIVATE, 22)
    # Another application's pod that happens to use our component name is not our gateway.
    impostor = Peer("10.244.8.8", ((COMPONENT, "gateway"),), _ns(NAMESPACE))
    assert not _allowed(impostor, _pod("redis"), 6379)
    assert not _allowed(impostor, _vm("i-0123456789ab"), AGENT_PORT)


def test_network_policy_ports_are_numbers_and_the_agent_port_is_the_templates() -> None:
    for policy in _of_kind("NetworkPolicy"):
        spec = policy.obj["spec"]
        for rule in [*spec.get("ingress", []), *spec.get("egress", [])]:
            for port in rule.get("ports", []):
                assert isinstance(port["port"], int), policy
    for template in _of_kind(contract.TEMPLATE_KIND):
        assert template.obj["spec"]["agentPort"] == AGENT_PORT, template


def test_the_readme_says_how_to_deploy() -> None:
    readme = (K8S / "README.md").read_text()
    assert "kubectl apply -k k8s/" in readme
    for needed in ("KubeVirt", "CDI", "storage class", "kubectl apply -k k8s/crds", "guest-image"):
        assert needed in readme, needed


# --- RBAC against the code ------------------------------------------------------------------------

_RUNTIME = ROOT / "instance_svc" / "runtime" / "kubevirt"
_OPERATOR = ROOT / "instance_svc" / "operator"
# instance_svc's Kube wrapper (runtime/kubevirt/kube.py): its method -> the RBAC verb of its request.
_WRAPPER_VERBS = {
    "get": "get",
    "create": "create",
    "patch": "patch",
    "delete": "delete",
    "list": "list",
    "secret_data": "get",
    "config_map": "get",
    "create_config_map": "create",
    "replace_config_map": "update",
}
_WRAPPER_RESOURCES = {"secret_data": "secrets", "config_map": "configmaps", "create_config_map": "configmaps"}
_WRAPPER_RESOURCES["replace_config_map"] = "configmaps"
# Its Leases (coordination.k8s.io): put_lease creates, or patches the existing one.
_LEASE_VERBS = {"lease": ("get",), "put_lease": ("create", "patch"), "delete_lease": ("delete",)}


def _grants(account: str) -> set[tuple[str, str]]:
    return {(resource, verb) for _group, resource, verb in _rules(account)}


def test_instance_svc_may_do_exactly_what_its_runtime_does() -> None:
    """Every API call of the kubevirt runtime (through its Kube wrapper and its watches) against the Role."""
    source = "\n".join(p.read_text() for p in sorted(_RUNTIME.glob("*.py")) if p.name != "kube.py")
    calls: set[tuple[str, str]] = set()
    for method, plural in re.findall(r"kube\.(get|create|patch|delete|list),\s*contract\.(\w+_PLURAL)", source):
        calls.add((getattr(contract, plural), _WRAPPER_VERBS[method]))
    for method, plural in re.findall(r"kube\.(get|create|patch|delete|list)\(contract\.(\w+_PLURAL)", source):
        calls.add((getattr(contract, plural), _WRAPPER_VERBS[method]))
    for method in re.findall(r"kube\.(secret_data|config_map|create_config_map|replace_config_map)\b", source):
        calls.add((_WRAPPER_RESOURCES[method], _WRAPPER_VERBS[method]))
    for method in re.findall(r"kube\.(lease|put_lease|delete_lease)\b", source):
        calls |= {("leases", verb) for verb in _LEASE_VERBS[method]}
    # Every public method of the wrapper is one of those above (a new one needs its verbs here).
    wrapper = (_RUNTIME / "kube.py").read_text()
    methods = set(re.findall(r"^    def ([a-z]\w*)\(self", wrapper, re.MULTILINE)) - {"close", "requests", "call_api"}
    assert methods <= set(_WRAPPER_VERBS) | set(_LEASE_VERBS), methods - set(_WRAPPER_VERBS) - set(_LEASE_VERBS)
    # A Watcher lists, then watches (watcher.py); its default plural is the instances'.
    for plural in re.findall(r"Watcher\(kube(?:, contract\.(\w+_PLURAL))?\)", source):
        resource = getattr(contract, plural) if plural else contract.INSTANCE_PLURAL
        calls |= {(resource, "list"), (resource, "watch")}
    assert (contract.INSTANCE_PLURAL, "create") in calls and ("configmaps", "update") in calls  # the scan works
    assert _grants("instance-svc") == calls


def _operator_resources() -> set[str]:
    """The resources the operator's code names in its API paths (contract plurals and literal ones)."""
    source = "\n".join(p.read_text() for p in sorted(_OPERATOR.glob("*.py")) if p.name != "contract.py")
    names = {getattr(contract, c) for c in re.findall(r"contract\.(\w+_PLURAL)\b", source)}
    names |= set(re.findall(r'path\("[^"]*", "v1", "(\w+)"', source))
    # kopf's own: the Events it posts and the CRDs it watches to see its resources come and go.
    return names | {"events", "customresourcedefinitions"}


def test_the_operator_may_touch_exactly_the_resources_its_code_names() -> None:
    granted = {resource.split("/")[0] for resource, _verb in _grants("instance-operator")}
    assert granted == _operator_resources()
    grants = _grants("instance-operator")
    # kopf watches what it handles and what it indexes, and patches its finalizer and state into
    # what it handles; the operator patches their status.
    for plural in (contract.INSTANCE_PLURAL, contract.SNAPSHOT_PLURAL, contract.WARM_POOL_PLURAL):
        assert {(plural, "list"), (plural, "watch"), (plural, "patch"), (f"{plural}/status", "patch")} <= grants
    for plural in (contract.VM_PLURAL, contract.VMI_PLURAL, contract.VM_SNAPSHOT_PLURAL, contract.VM_RESTORE_PLURAL):
        assert {(plural, "list"), (plural, "watch")} <= grants, plural
    # Pause and resume are PUTs of KubeVirt's subresources.
    assert {(f"{contract.VMI_PLURAL}/pause", "update"), (f"{contract.VMI_PLURAL}/unpause", "update")} <= grants
    # Nothing the operator never does: it deletes no snapshot or restore (their owners' garbage
    # collection does), never writes a template or a VMI.
    assert not {v for r, v in grants if r == contract.TEMPLATE_PLURAL} - {"get"}
    assert not {v for r, v in grants if r == contract.VMI_PLURAL} - {"list", "watch"}
    assert (contract.VM_SNAPSHOT_PLURAL, "delete") not in grants


def test_with_the_operators_per_vm_policies() -> None:
    """The deploy's policies together with the per-VM NetworkPolicy the operator writes (manifests.network_policy)."""
    from instance_svc.operator import manifests

    def vm_policy(vm: Peer, network: Obj | None) -> Obj:
        name = vm.pod_labels[contract.LABEL_VM]
        owner = {
            "apiVersion": contract.API_VERSION,
            "kind": contract.INSTANCE_KIND,
            "metadata": {"name": name, "uid": "u-1"},
        }
        policy = manifests.network_policy(
            name,
            NAMESPACE,
            owner=manifests.owner_ref(owner),
            labels=manifests.common_labels(name, instance=name, tenant="t1"),
            port=AGENT_PORT,
            network=network,
        )
        kube_schemas.validate_builtin(policy)
        return policy

    online, offline = _vm("i-00000000000a"), _vm("i-00000000000b")
    policies = (vm_policy(online, {"mode": contract.NETWORK_INTERNET}), vm_policy(offline, None))
    for caller in ("gateway", "instance-svc", "instance-operator"):
        assert _allowed(_pod(caller), online, AGENT_PORT, extra=policies), caller
        assert not _allowed(_pod(caller), online, 22, extra=policies), caller
    for caller in ("billing", "redis"):
        assert not _allowed(_pod(caller), online, AGENT_PORT, extra=policies), caller
    # An Internet VM reaches the internet and the cluster DNS, nothing private, nor the metadata
    # service, nor Redis, nor another VM's agent.
    assert _allowed(online, INTERNET, 443, extra=policies) and _allowed(online, INTERNET, 80, extra=policies)
    assert _allowed(online, KUBE_DNS, 53, "UDP", extra=policies)
    for target, port in [
        (METADATA, 80),
        (PRIVATE, 22),
        (API_SERVER, 443),
        (_pod("redis"), 6379),
        (offline, AGENT_PORT),
    ]:
        assert not _allowed(online, target, port, extra=policies), f"{target.ip}:{port}"
    # A VM of network mode None reaches nothing at all.
    for target, port in [(INTERNET, 443), (KUBE_DNS, 53), (online, AGENT_PORT)]:
        assert not _allowed(offline, target, port, extra=policies), f"{target.ip}:{port}"
