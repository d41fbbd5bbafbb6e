"""Schema validators for Kubernetes objects, without a cluster.

Three validators, each returning every error it finds (``*_errors``) or raising `Invalid` with all of
them (``validate_*``):

- `validate_builtin(obj)`: a built-in kind (Deployment, Role, NetworkPolicy, CustomResourceDefinition,
  ...) against the Kubernetes OpenAPI schemas that `kubernetes-validate` bundles, in its strict mode
  (an unknown field is an error, not something silently dropped). The version is `KUBERNETES_VERSION`,
  the oldest release the deploy supports (docs/kubernetes.md), so a field added later fails too.
- `validate_kubevirt(obj)`: a KubeVirt object (VirtualMachine, VirtualMachineInstance,
  VirtualMachinePool, VirtualMachineSnapshot, VirtualMachineRestore, ...) against KubeVirt's own
  OpenAPI document (``k8s/schemas/kubevirt-openapi.json``, KubeVirt's
  ``api/openapi-spec/swagger.json``). That document never says ``additionalProperties: false``, yet
  KubeVirt's CRDs are structural: the API server drops an unknown field (with a warning only, for a
  client such as the Python one that does not ask for strict field validation). An object with
  ``properties`` and no ``additionalProperties`` is therefore closed here: a misspelt field fails
  instead of vanishing on the server.
- `validate_against_crd(obj, crd)`: a custom resource against its CRD's ``openAPIV3Schema`` for the
  version in ``obj["apiVersion"]``, with the Kubernetes extensions: closed objects (unless
  ``x-kubernetes-preserve-unknown-fields``), ``nullable``, ``x-kubernetes-int-or-string``, enums,
  required, formats, list types ``set``/``map`` (uniqueness), and the CEL rules of
  ``x-kubernetes-validations``, evaluated with cel-python (celpy). Transition rules (those naming
  ``oldSelf``) run only when `old` is given, as on an update. ``metadata`` is checked against
  ObjectMeta, and ``metadata.name`` is a DNS subdomain, as the API server requires of a CR.

Nulls: a null where the schema does not say ``nullable`` is an error here. The API server instead
prunes such a null for CRDs, so this is stricter: what we write should carry no such nulls.

CEL: celpy implements the standard CEL library (``has``, ``size``, ``matches``, macros,
``timestamp``, ...). Of Kubernetes' extension libraries, the functions below in `_CEL_EXTENSIONS`
are added here (IP/CIDR, strings); a rule calling any other extension fails loudly as "could not
be evaluated here" rather than passing. CEL cost limits are not modelled.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate.utils as kv_utils
import referencing
import referencing.jsonschema
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError

ROOT = Path(__file__).resolve().parents[2]
KUBEVIRT_OPENAPI = ROOT / "k8s" / "schemas" / "kubevirt-openapi.json"
CRD_DIR = ROOT / "k8s" / "crds"
# The oldest Kubernetes release the deploy supports (docs/kubernetes.md: the CRDs' CEL rules use
# isCIDR/isIP, new in 1.31); built-in objects are validated against its schemas.
KUBERNETES_VERSION = "1.31"

Obj = Mapping[str, Any]


class Invalid(AssertionError):
    """An object does not validate; `errors` lists every problem, each with its JSON path."""

    def __init__(self, what: str, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(f"{what} is invalid:\n  " + "\n  ".join(errors))


def _describe(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('apiVersion')} {obj.get('kind')} {meta.get('name') or meta.get('generateName') or '?'}"


def _path(parts: Iterable[Any]) -> str:
    return "/" + "/".join(str(p) for p in parts)


# --- formats --------------------------------------------------------------------------------------

_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", re.IGNORECASE)
_FORMATS = jsonschema.FormatChecker(formats=())


def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _RFC3339.fullmatch(value):
        return False
    datetime.fromisoformat(value.upper().replace("Z", "+00:00"))  # the date itself (raises on 2026-13-40)
    return True


def _byte(value: object) -> bool:
    if isinstance(value, str):
        base64.b64decode(value, validate=True)
    return True


def _int_range(bits: int) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        return not isinstance(value, int) or -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)

    return check


_FORMATS.checks("date-time", raises=ValueError)(_date_time)
_FORMATS.checks("byte", raises=binascii.Error)(_byte)
_FORMATS.checks("int32")(_int_range(32))
_FORMATS.checks("int64")(_int_range(64))


# --- schema conversion ----------------------------------------------------------------------------


def _with_null(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        schema["type"] = [kind, "null"]
    elif isinstance(kind, list) and "null" not in kind:
        schema["type"] = [*kind, "null"]
    if "enum" in schema and None not in schema["enum"]:
        schema["enum"] = [*schema["enum"], None]
    return schema


def _openapi_to_jsonschema(node: Any, *, crd: bool = False) -> Any:
    """An OpenAPI (v2 definitions or a CRD's v3) schema as a draft-4 JSON Schema with Kubernetes' meaning.

    `crd`: a CRD's structural schema, where an object that lists no properties (and neither
    additionalProperties nor x-kubernetes-preserve-unknown-fields) keeps no field at all (the API
    server prunes every one). In KubeVirt's OpenAPI document such an object is free-form
    (RawExtension, FieldsV1), so it stays open there.
    """
    if isinstance(node, list):
        return [_openapi_to_jsonschema(item, crd=crd) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "definitions", "patternProperties"):
            out[key] = {name: _openapi_to_jsonschema(sub, crd=crd) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = _openapi_to_jsonschema(value, crd=crd)
        elif key in ("description", "default", "example", "x-kubernetes-validations"):
            continue  # no effect on validity here (CEL rules are walked separately)
        else:
            out[key] = value
    if out.get("format") == "int-or-string" or out.pop("x-kubernetes-int-or-string", False):
        # IntOrString: the schemas say "string", YAML and clients write 8080 as a number.
        out.pop("format", None)
        out["type"] = ["integer", "string"]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if out.pop("x-kubernetes-embedded-resource", False):
        # An embedded object: apiVersion, kind and metadata are allowed even when not listed.
        props = out.setdefault("properties", {})
        for name in ("apiVersion", "kind"):
            props.setdefault(name, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    closed = "properties" in out or (crd and out.get("type") == "object")
    if closed and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if out.pop("nullable", False):
        _with_null(out)
    return out


def _validator(schema: Any, registry: referencing.Registry[Any] | None = None) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.Draft4Validator
    if registry is None:
        return cls(schema, format_checker=_FORMATS)
    return cls(schema, registry=registry, format_checker=_FORMATS)


def _schema_errors(validator: jsonschema.protocols.Validator, obj: Obj) -> list[str]:
    errors = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        # anyOf/oneOf: the branch errors say more than "is not valid under any of the given schemas".
        detail = "; ".join(sorted({c.message for c in error.context})) if error.context else ""
        errors.append(f"{_path(error.absolute_path)}: {error.message}" + (f" ({detail})" if detail else ""))
    return errors


# --- KubeVirt -------------------------------------------------------------------------------------

_KUBEVIRT_URI = "urn:cyberdesk:kubevirt-openapi"
_COLLECTION_PATH = re.compile(r"/apis/([^/]+)/([^/]+)/namespaces/\{namespace\}/([^/]+)")


@functools.cache
def _kubevirt() -> tuple[dict[tuple[str, str], str], referencing.Registry[Any]]:
    """(apiVersion, kind) -> definition name, and a registry holding the converted definitions."""
    if not KUBEVIRT_OPENAPI.is_file():
        raise FileNotFoundError(f"KubeVirt's OpenAPI document is not at {KUBEVIRT_OPENAPI} (k8s/schemas)")
    document = json.loads(KUBEVIRT_OPENAPI.read_text())
    kinds: dict[tuple[str, str], str] = {}
    # The kinds a client may create: each namespaced collection's POST body names its definition.
    for path, operations in document["paths"].items():
        found = _COLLECTION_PATH.fullmatch(path)
        post = operations.get("post")
        if not found or not post:
            continue
        for parameter in post.get("parameters", []):
            ref = parameter.get("schema", {}).get("$ref", "")
            if parameter.get("in") == "body" and ref.startswith("#/definitions/"):
                definition = ref.removeprefix("#/definitions/")
                kinds[(f"{found.group(1)}/{found.group(2)}", definition.rsplit(".", 1)[-1])] = definition
    resource = referencing.Resource.from_contents(
        {"definitions": {name: _openapi_to_jsonschema(d) for name, d in document["definitions"].items()}},
        default_specification=referencing.jsonschema.DRAFT4,
    )
    return kinds, referencing.Registry().with_resource(_KUBEVIRT_URI, resource)


def kubevirt_kinds() -> set[tuple[str, str]]:
    """The (apiVersion, kind) pairs `validate_kubevirt` knows."""
    return set(_kubevirt()[0])


@functools.cache
def _kubevirt_validator(definition: str) -> jsonschema.protocols.Validator:
    _, registry = _kubevirt()
    return _validator({"$ref": f"{_KUBEVIRT_URI}#/definitions/{definition}"}, registry)


def kubevirt_errors(obj: Obj) -> list[str]:
    kinds, _ = _kubevirt()
    definition = kinds.get((str(obj.get("apiVersion")), str(obj.get("kind"))))
    if definition is None:
        return [f"/: {obj.get('apiVersion')} {obj.get('kind')} is not a KubeVirt kind one can create"]
    errors = _schema_errors(_kubevirt_validator(definition), obj)
    return errors + _name_errors(obj)


def validate_kubevirt(obj: Obj) -> None:
    """Raise `Invalid` unless `obj` is a valid KubeVirt object (unknown fields included, see the module)."""
    errors = kubevirt_errors(obj)
    if errors:
        raise Invalid(_describe(obj), errors)


# --- built-in kinds (kubernetes-validate, strict) ---------------------------------------------------


@functools.cache
def _builtin_registry(version: str) -> tuple[str, referencing.Registry[Any]]:
    # The newest bundled schema release not newer than `version` (as kubernetes_validate.validate picks).
    wanted = kv_utils.major_minor(version)
    release = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) <= wanted][-1]
    directory = f"kubernetes-json-schema/v{release}-local-strict"
    definitions = referencing.Resource.from_contents(
        kv_utils.schema_contents(f"{directory}/_definitions.json", version)
    )
    return directory, definitions @ referencing.Registry()


@functools.cache
def _builtin_validator(version: str, api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
    directory, registry = _builtin_registry(version)
    # rbac.authorization.k8s.io/v1 -> rbac-v1 (kubernetes-validate's file naming).
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = kv_utils.schema_contents(f"{directory}/{kind.lower()}-{group_version}.json", version)
    except FileNotFoundError:
        return None
    resource = referencing.Resource.from_contents(schema)
    return jsonschema.validators.Draft202012Validator(schema, registry=resource @ registry, format_checker=_FORMATS)


def builtin_errors(obj: Obj, version: str = KUBERNETES_VERSION) -> list[str]:
    api_version, kind = str(obj.get("apiVersion")), str(obj.get("kind"))
    validator = _builtin_validator(version, api_version, kind)
    if validator is None:
        return [f"/: {api_version} {kind} is not a built-in kind of Kubernetes {version}"]
    # RBAC names are path segments ("system:aggregate-to-view"), not DNS subdomains.
    return _schema_errors(validator, obj) + _name_errors(obj, dns_name=not api_version.startswith("rbac."))


def validate_builtin(obj: Obj, version: str = KUBERNETES_VERSION) -> None:
    """Raise `Invalid` unless `obj` is a valid built-in object of Kubernetes `version`, unknown fields included."""
    errors = builtin_errors(obj, version)
    if errors:
        raise Invalid(_describe(obj), errors)


# --- names ----------------------------------------------------------------------------------------

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def _qualified_name(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return False
    return len(name) <= 63 and bool(_LABEL_NAME.fullmatch(name))


def _name_errors(obj: Obj, *, dns_name: bool = True) -> list[str]:
    """What the API server checks of every object's metadata beyond its schema: names, label syntax."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return ["/metadata: missing"]
    errors = []
    name = meta.get("name")
    if name is None and not meta.get("generateName"):
        errors.append("/metadata/name: a name or generateName is required")
    # Most kinds' names are DNS subdomains; the stricter kinds (Service, Namespace: DNS labels) are
    # the business of their own tests.
    if dns_name and isinstance(name, str) and (len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name)):
        errors.append(f"/metadata/name: {name!r} is not a DNS subdomain (lower case, digits, '-', '.')")
    for key, value in (meta.get("labels") or {}).items():
        if not _qualified_name(str(key)):
            errors.append(f"/metadata/labels: key {key!r} is not a qualified name")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            errors.append(f"/metadata/labels/{key}: {value!r} is not a label value")
    for key in meta.get("annotations") or {}:
        if not _qualified_name(str(key)):
            errors.append(f"/metadata/annotations: key {key!r} is not a qualified name")
    return errors


# --- CRDs -----------------------------------------------------------------------------------------


def load_crds(directory: Path = CRD_DIR) -> dict[tuple[str, str], dict[str, Any]]:
    """Every CustomResourceDefinition under `directory`, by (group, kind)."""
    crds: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                crds[(doc["spec"]["group"], doc["spec"]["names"]["kind"])] = doc
    return crds


def _find_crd(obj: Obj, crd: Path | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(crd, Mapping):
        return crd
    group = str(obj.get("apiVersion", "")).partition("/")[0]
    for doc in yaml.safe_load_all(Path(crd).read_text()):
        if (
            isinstance(doc, dict)
            and doc.get("kind") == "CustomResourceDefinition"
            and (doc["spec"]["group"], doc["spec"]["names"]["kind"]) == (group, obj.get("kind"))
        ):
            return doc
    raise ValueError(f"{crd} defines no CRD for {obj.get('apiVersion')} {obj.get('kind')}")


def _crd_version(crd: Mapping[str, Any], obj: Obj) -> tuple[dict[str, Any] | None, list[str]]:
    spec = crd["spec"]
    group, _, version = str(obj.get("apiVersion", "")).partition("/")
    if group != spec["group"]:
        return None, [f"/apiVersion: group {group!r} is not the CRD's {spec['group']!r}"]
    if obj.get("kind") != spec["names"]["kind"]:
        return None, [f"/kind: {obj.get('kind')!r} is not the CRD's {spec['names']['kind']!r}"]
    for candidate in spec["versions"]:
        if candidate["name"] == version:
            if not candidate.get("served", False):
                return None, [f"/apiVersion: version {version!r} is not served"]
            schema: dict[str, Any] = candidate["schema"]["openAPIV3Schema"]
            return schema, []
    return None, [f"/apiVersion: the CRD has no version {version!r}"]


@functools.cache
def _crd_validator(schema_json: str) -> jsonschema.protocols.Validator:
    schema = _openapi_to_jsonschema(json.loads(schema_json), crd=True)
    # The API server owns apiVersion, kind and metadata at the top of every CR; metadata is ObjectMeta.
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"type": "string"}
    props["kind"] = {"type": "string"}
    props["metadata"] = {"$ref": f"{_KUBEVIRT_URI}#/definitions/k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    _, registry = _kubevirt()
    return _validator(schema, registry)


def crd_errors(obj: Obj, crd: Path | str | Mapping[str, Any], *, old: Obj | None = None) -> list[str]:
    """Every way `obj` breaks its CRD; with `old`, as an update from `old` (transition rules run)."""
    schema, errors = _crd_version(_find_crd(obj, crd), obj)
    if schema is None:
        return errors
    errors = _schema_errors(_crd_validator(json.dumps(schema, sort_keys=True)), obj)
    errors += _name_errors(obj)
    errors += _list_map_errors(schema, obj, [])
    # CEL rules run on what the structure let through (the API server does the same: a rule on a
    # field of the wrong type would only fail with a type error).
    if not errors:
        errors += _cel_errors(schema, obj, old, [], root=True)
    return errors


def validate_against_crd(obj: Obj, crd: Path | str | Mapping[str, Any], *, old: Obj | None = None) -> None:
    """Raise `Invalid` unless `obj` is a valid custom resource of `crd` (a CRD document or a YAML file)."""
    errors = crd_errors(obj, crd, old=old)
    if errors:
        raise Invalid(_describe(obj), errors)


def _children(schema: Mapping[str, Any], value: Any) -> Iterable[tuple[Any, Mapping[str, Any], Any]]:
    """(key, child schema, child value) for the parts of `value` its schema describes."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            if key in props:
                yield key, props[key], child
            elif isinstance(extra, dict):
                yield key, extra, child
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, child in enumerate(value):
            yield index, schema["items"], child


def _list_map_errors(schema: Mapping[str, Any], value: Any, where: list[Any]) -> list[str]:
    errors = []
    if schema.get("x-kubernetes-list-type") == "map" and isinstance(value, list):
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen = set()
        for index, item in enumerate(value):
            if isinstance(item, dict):
                key = tuple(json.dumps(item.get(k)) for k in keys)
                if key in seen:
                    errors.append(f"{_path([*where, index])}: duplicate entry for the keys {keys}")
                seen.add(key)
    for key, child_schema, child in _children(schema, value):
        errors += _list_map_errors(child_schema, child, [*where, key])
    return errors


# --- CEL ------------------------------------------------------------------------------------------


def _cel_is_ip(value: celtypes.Value) -> celtypes.BoolType:
    try:
        address = ipaddress.ip_address(str(value))
    except ValueError:
        return celtypes.BoolType(False)
    # Kubernetes' isIP refuses IPv4-mapped IPv6 addresses and zones (ipaddress refuses zones only with %).
    return celtypes.BoolType(not (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped))


def _cel_is_cidr(value: celtypes.Value) -> celtypes.BoolType:
    text = str(value)
    if "/" not in text:
        return celtypes.BoolType(False)
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(not (isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped))


_CEL_EXTENSIONS: dict[str, Callable[..., Any]] = {
    # Kubernetes' IP library (1.31): isIP(string), isCIDR(string).
    "isIP": _cel_is_ip,
    "isCIDR": _cel_is_cidr,
    # Kubernetes' string library.
    "lowerAscii": lambda s: celtypes.StringType(str(s).lower()),
    "upperAscii": lambda s: celtypes.StringType(str(s).upper()),
    "trim": lambda s: celtypes.StringType(str(s).strip()),
}


@functools.cache
def _cel_program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule), functions=_CEL_EXTENSIONS)


def _cel_eval(rule: str, activation: dict[str, Any]) -> tuple[bool | None, str]:
    """(result, error): None with the error when the rule cannot be evaluated."""
    try:
        result = _cel_program(rule).evaluate({k: json_to_cel(v) for k, v in activation.items()})
    except CELParseError as error:
        return None, f"does not parse: {error}"
    except Exception as error:  # celpy raises its own errors and KeyErrors for unknown functions
        return None, str(error.args[0] if error.args else error).split(" (in activation")[0][:300]
    if isinstance(result, CELEvalError):
        return None, str(result.args[0] if result.args else result).split(" (in activation")[0][:300]
    if not isinstance(result, celtypes.BoolType):
        return None, f"gives {type(result).__name__}, not a bool"
    return bool(result), ""


def _names_old_self(rule: str) -> bool:
    return re.search(r"\boldSelf\b", rule) is not None


def _cel_errors(schema: Mapping[str, Any], value: Any, old: Any, where: list[Any], *, root: bool = False) -> list[str]:
    errors = []
    for check in schema.get("x-kubernetes-validations") or []:
        rule = check["rule"]
        transition = _names_old_self(rule)
        if transition and old is None:
            continue  # a transition rule applies to updates only, with an old value to compare
        scope = value
        if root and isinstance(value, dict):
            # At the root a rule sees apiVersion, kind, metadata.name and metadata.generateName only.
            meta = value.get("metadata") or {}
            scope = {**value, "metadata": {k: meta[k] for k in ("name", "generateName") if k in meta}}
        activation: dict[str, Any] = {"self": scope}
        if transition:
            activation["oldSelf"] = old
        ok, problem = _cel_eval(rule, activation)
        at = _path(where)
        if ok is None:
            errors.append(f"{at}: the rule {rule!r} could not be evaluated here: {problem}")
        elif not ok:
            message = check.get("message") or f"failed rule: {rule}"
            errors.append(f"{at}: {message}")
    for key, child_schema, child in _children(schema, value):
        old_child = _correlate(schema, old, key, child)
        errors += _cel_errors(child_schema, child, old_child, [*where, key])
    return errors


def _correlate(schema: Mapping[str, Any], old: Any, key: Any, child: Any) -> Any:
    """The old value a child is compared with: same key of an object, same map keys of a list-map."""
    if old is None:
        return None
    if isinstance(old, dict) and isinstance(key, str):
        return old.get(key)
    if isinstance(old, list) and schema.get("x-kubernetes-list-type") == "map" and isinstance(child, dict):
        keys = schema.get("x-kubernetes-list-map-keys") or []
        for item in old:
            if isinstance(item, dict) and all(item.get(k) == child.get(k) for k in keys):
                return item
    return None  # Kubernetes does not correlate items of other lists: their transition rules do not run


# --- one entry for all ----------------------------------------------------------------------------


def validate(obj: Obj, crds: Mapping[tuple[str, str], Mapping[str, Any]] | None = None) -> None:
    """Validate any object: a CR of ours against its CRD, KubeVirt's against KubeVirt's, the rest as built-ins."""
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    known = load_crds() if crds is None else crds
    crd = known.get((group, str(obj.get("kind"))))
    if crd is not None:
        validate_against_crd(obj, crd)
    elif group == "kubevirt.io" or group.endswith(".kubevirt.io"):
        validate_kubevirt(obj)
    else:
        validate_builtin(obj)
