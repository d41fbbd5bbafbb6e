"""A Kubernetes API server emulator on kmock: the semantics operators and clients rely on, on real HTTP.

kmock gives the HTTP server (aiohttp), the discovery documents (`/api`, `/apis`, `/apis/<g>/<v>`)
and the resource registry. Its own object store (`kmock.KubernetesEmulator`, 0.8) lacks most of
what a controller depends on (../shared/design/KUBERNETES.md lists it: no uid, resourceVersion or
generation, 200 on create, no PUT, /status applying the whole body, no selectors, watches that
replay everything, no garbage collection, matching every request against the whole history), so
this module keeps its own store and serves every resource request itself:

- metadata: uid, resourceVersion (one counter for all objects, as etcd's revision), generation
  (bumped on changes outside metadata and status), creationTimestamp, namespace from the URL,
  generateName; create answers 201, 409 AlreadyExists on a taken name, 404 in a missing namespace.
- writes: PUT (replace), merge patch (RFC 7386, null deletes), JSON patch (RFC 6902, a failed
  `test` is 422 as kopf expects), strategic merge patch (as a merge patch: lists are replaced);
  a write carrying a stale metadata.resourceVersion is 409 Conflict; a write that changes nothing
  changes no resourceVersion and sends no event.
- status subresource: `/status` writes change only status; main-resource writes leave status alone
  (for resources registered with the "status" subresource, as CRDs with `subresources.status`).
- custom resources: pruned and validated against their CRD's OpenAPI schema (422 Invalid);
  POSTing a CustomResourceDefinition registers its resource.
- reads: lists with kind/apiVersion/resourceVersion, label and field selectors, limit/continue.
- watches: from a resourceVersion (replayed from a bounded per-resource log, 410 Gone when older),
  sendInitialEvents with the initial-events-end bookmark, periodic bookmarks, timeoutSeconds,
  label selectors with objects entering (ADDED) and leaving (DELETED) the selection.
- deletion: finalizers hold an object with deletionTimestamp until they are removed; delete
  preconditions (uid, resourceVersion); ownerReference garbage collection (background, foreground
  and orphan propagation), as kube-controller-manager's garbage collector does.
- counters of every request by verb and resource (`stats()`, and GET /emulator/stats), for bench.

Everything runs on one event loop, and no store operation awaits, so each request's read-check-
write is atomic without locks.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import jsonpatch
import kmock

from kube_emulator import schema as crd_schema
from kube_emulator.selectors import SelectorError, field_selector, label_selector

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str, str]  # (resource key "group/version/plural", namespace or "", name)
# A handler of a custom subresource: (emulator, resource, namespace, name, request body) -> (status, payload).
SubresourceHandler = Callable[["Emulator", "Resource", str, str, Any], tuple[int, Obj]]


class ApiError(Exception):
    """An answer of the API server with a `Status` body."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


@dataclass
class Resource:
    """One served resource (group/version/plural) and how the server treats it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    subresources: frozenset[str] = frozenset()
    # Whether metadata.generation is tracked (CRs and most workloads; not Secrets or ConfigMaps).
    generation: bool = True
    # The CRD's openAPIV3Schema, for pruning and validation (custom resources only).
    schema: Obj | None = None
    short_names: tuple[str, ...] = ()
    singular: str = ""
    # PUT on main or /status without metadata.resourceVersion: allowed for built-ins, not for CRs.
    unconditional_update: bool = True

    @property
    def key(self) -> str:
        return f"{self.group}/{self.version}/{self.plural}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    def qualified(self) -> str:
        """How the API server names the resource in messages: "cyberdeskinstances.cyberdesk.io"."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


@dataclass
class _Watcher:
    resource: Resource
    namespace: str
    labels: Callable[[Mapping[str, Any]], bool]
    fields: Callable[[Mapping[str, Any]], bool]
    name: str | None
    queue: asyncio.Queue[tuple[str, Obj] | None] = field(default_factory=asyncio.Queue)

    def selects(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if self.namespace and meta.get("namespace", "") != self.namespace:
            return False
        if self.name is not None and meta.get("name") != self.name:
            return False
        return self.labels(meta.get("labels") or {}) and self.fields(obj)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null removes a key, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _subresource_entries(payload: Any) -> Any:
    """As the API server lists a subresource ("plural/status"): no short names or categories (kmock
    copies the resource's, and kubectl then finds "cdi" ambiguous), only the verbs it serves."""
    for entry in payload.get("resources", []):
        if "/" in entry.get("name", ""):
            entry["shortNames"], entry["categories"] = [], []
            entry["verbs"] = ["get", "patch", "update"]
    return payload


def _without(obj: Obj, *keys: str) -> Obj:
    return {k: v for k, v in obj.items() if k not in keys}


class Emulator:
    """The store and the API semantics; `app` is what kmock's HTTP server serves."""

    def __init__(self, *, namespaces: Iterable[str] = ("default", "kube-system"), log_size: int = 200_000) -> None:
        # kmock's scaffold renders discovery from this registry; our Resource records carry the rest.
        self.scaffold = kmock.KubernetesScaffold()
        self.resources: dict[str, Resource] = {}
        self._by_group_version: dict[tuple[str, str], dict[str, Resource]] = collections.defaultdict(dict)
        self.objects: dict[Key, Obj] = {}
        self._per_resource: dict[str, dict[tuple[str, str], Obj]] = collections.defaultdict(dict)
        self._by_uid: dict[str, Key] = {}
        self._dependents: dict[str, set[Key]] = collections.defaultdict(set)  # owner uid -> dependents
        self._revision = 0
        self._log_size = log_size
        self._logs: dict[str, collections.deque[tuple[int, str, Obj]]] = {}
        self._watchers: dict[str, list[_Watcher]] = collections.defaultdict(list)
        self.subresource_handlers: dict[tuple[str, str, str], SubresourceHandler] = {}
        # (verb, resource key) -> count; verb as in RBAC: get list watch create update patch delete.
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        # Calls of custom subresources: (group, plural, subresource, namespace, name), in order.
        self.subresource_calls: list[tuple[str, str, str, str, str]] = []
        self.bookmark_seconds = 20.0
        self.servers: list[Any] = []  # kmock.Server registers itself here
        # In-process controllers (kube_emulator.virt_controller) hear every event of a resource, on
        # the loop after the write (never inside it), as a watch would deliver it.
        self.listeners: dict[str, list[Callable[[str, Obj, Obj | None], None]]] = collections.defaultdict(list)
        # Called before each resource request is served: (verb, resource key, name or None). Tests
        # use it to act at an exact point of a client's work (e.g. kill it at its third VM create).
        self.request_hooks: list[Callable[[str, str, str | None], None]] = []
        self._gc_pending: set[str] = set()
        from kube_emulator import resources as builtin  # the registry of built-ins and KubeVirt

        builtin.register_all(self)
        for ns in namespaces:
            self.put_object("/v1/namespaces", {"metadata": {"name": ns}})

    # -- registry ----------------------------------------------------------------------------------

    def register(self, res: Resource) -> Resource:
        """Serve `res` (and list it in discovery)."""
        self.resources[res.key] = res
        self._by_group_version[(res.group, res.version)][res.plural] = res
        self._logs.setdefault(res.key, collections.deque(maxlen=self._log_size))
        verbs = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
        self.scaffold.resources[res.key] = kmock.ResourceInfo(
            kind=res.kind,
            namespaced=res.namespaced,
            singular=res.singular or res.kind.lower(),
            verbs=verbs,
            shortnames=set(res.short_names),
            subresources=set(res.subresources),
        )
        return res

    def register_crd(self, crd: Obj) -> list[Resource]:
        """Serve the resources a CustomResourceDefinition defines (every served version)."""
        spec = crd["spec"]
        names = spec["names"]
        out = []
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            subs = frozenset((version.get("subresources") or {}).keys())
            out.append(
                self.register(
                    Resource(
                        group=spec["group"],
                        version=version["name"],
                        plural=names["plural"],
                        kind=names["kind"],
                        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                        subresources=subs,
                        schema=(version.get("schema") or {}).get("openAPIV3Schema"),
                        short_names=tuple(names.get("shortNames", ())),
                        singular=names.get("singular", ""),
                        unconditional_update=False,
                    )
                )
            )
        return out

    def resource(self, key: str) -> Resource:
        """The resource for "group/version/plural" (core: "/v1/secrets")."""
        return self.resources[key]

    # -- store (direct, in-process; writes emit watch events like HTTP writes) ---------------------

    def get_object(self, key: str, name: str, namespace: str = "") -> Obj | None:
        """The stored object, or None (a copy is not made: do not mutate it)."""
        return self._per_resource[key].get((namespace, name))

    def list_objects(self, key: str, namespace: str = "", selector: str = "") -> list[Obj]:
        match = label_selector(selector)
        return [
            obj
            for (ns, _), obj in self._per_resource[key].items()
            if (not namespace or ns == namespace) and match(obj["metadata"].get("labels") or {})
        ]

    def put_object(self, key: str, obj: Obj, namespace: str = "") -> Obj:
        """Create `obj` as a POST would (status kept, as a controller writing it would)."""
        return self._create(self.resources[key], namespace or obj.get("metadata", {}).get("namespace", ""), obj)

    def patch_object(self, key: str, name: str, patch: Obj, namespace: str = "", subresource: str | None = None) -> Obj:
        """Merge-patch as a PATCH would (subresource "status" writes only the status)."""
        res = self.resources[key]
        current = self._existing(res, namespace, name)
        return self._update(res, namespace, name, _merge_patch(current, patch), subresource, check_rv=True)

    def delete_object(self, key: str, name: str, namespace: str = "", propagation: str = "Background") -> None:
        self._delete(self.resources[key], namespace, name, {"propagationPolicy": propagation})

    @property
    def revision(self) -> int:
        """The newest resourceVersion handed out."""
        return self._revision

    def stats(self) -> dict[str, Any]:
        """Request counts: total, by verb, and by verb and resource."""
        by_verb: collections.Counter[str] = collections.Counter()
        for (verb, _), n in self.requests.items():
            by_verb[verb] += n
        return {
            "total": sum(self.requests.values()),
            "by_verb": dict(by_verb),
            "by_resource": {f"{verb} {key}": n for (verb, key), n in sorted(self.requests.items())},
            "objects": len(self.objects),
            "revision": self._revision,
        }

    def reset_stats(self) -> None:
        self.requests.clear()
        self.subresource_calls.clear()

    # -- the semantics -----------------------------------------------------------------------------

    def _bump(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _not_found(self, res: Resource, name: str) -> ApiError:
        return ApiError(
            404,
            "NotFound",
            f'{res.qualified()} "{name}" not found',
            {"name": name, "group": res.group, "kind": res.plural},
        )

    def _existing(self, res: Resource, namespace: str, name: str) -> Obj:
        obj = self._per_resource[res.key].get((namespace, name))
        if obj is None:
            raise self._not_found(res, name)
        return obj

    def _check_namespace(self, res: Resource, namespace: str) -> None:
        if res.namespaced:
            if not namespace:
                raise ApiError(400, "BadRequest", "the server could not find the requested resource: namespace needed")
            if ("", namespace) not in self._per_resource["/v1/namespaces"]:
                raise ApiError(
                    404,
                    "NotFound",
                    f'namespaces "{namespace}" not found',
                    {"name": namespace, "kind": "namespaces"},
                )

    def _admit(self, res: Resource, obj: Obj, name: str) -> Obj:
        """Prune and validate a custom resource against its CRD schema (422 Invalid on errors)."""
        if res.schema is None:
            return obj
        pruned: Obj = crd_schema.prune(obj, res.schema)
        pruned["metadata"] = obj["metadata"]
        errors = crd_schema.validate(pruned, res.schema)
        if errors:
            raise ApiError(
                422,
                "Invalid",
                f'{res.kind}.{res.group} "{name}" is invalid: ' + "; ".join(errors),
                {"name": name, "group": res.group, "kind": res.kind, "causes": [{"message": e} for e in errors]},
            )
        return pruned

    def _create(self, res: Resource, namespace: str, body: Any, *, from_request: bool = False) -> Obj:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was not a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if not res.namespaced:
            namespace = ""
        elif meta.get("namespace") and namespace and meta["namespace"] != namespace:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        namespace = namespace or meta.get("namespace", "")
        self._check_namespace(res, namespace)
        name = meta.get("name") or ""
        if not name and meta.get("generateName"):
            name = meta["generateName"] + secrets.token_hex(3)[:5]
        if not name:
            raise ApiError(
                422,
                "Invalid",
                f"{res.kind} is invalid: metadata.name: Required value: name or generateName is required",
            )
        if (namespace, name) in self._per_resource[res.key]:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{res.qualified()} "{name}" already exists',
                {"name": name, "group": res.group, "kind": res.plural},
            )
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        for server_set in ("uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp"):
            meta.pop(server_set, None)
        meta["name"] = name
        if res.namespaced:
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if res.generation:
            meta["generation"] = 1
        if from_request and res.has_status:
            obj.pop("status", None)  # the API server ignores status on create when it is a subresource
        if res.kind == "CustomResourceDefinition":
            self.register_crd(obj)
        obj = self._admit(res, obj, name)
        meta = obj["metadata"]
        meta["resourceVersion"] = self._bump()
        key = (res.key, namespace, name)
        self.objects[key] = obj
        self._per_resource[res.key][(namespace, name)] = obj
        self._by_uid[meta["uid"]] = key
        self._index_owners(key, obj, None)
        self._emit(res, "ADDED", obj, None)
        self._gc_dangling(key, obj)
        return obj

    def _update(
        self,
        res: Resource,
        namespace: str,
        name: str,
        new: Any,
        subresource: str | None,
        *,
        check_rv: bool,
        require_rv: bool = False,
    ) -> Obj:
        old = self._existing(res, namespace, name)
        if not isinstance(new, dict):
            raise ApiError(400, "BadRequest", "the body of the request was not a JSON object")
        new = copy.deepcopy(new)
        new_meta = new.get("metadata") if isinstance(new.get("metadata"), dict) else {}
        old_meta = old["metadata"]
        rv = new_meta.get("resourceVersion")
        if require_rv and not rv and not res.unconditional_update:
            raise ApiError(
                422,
                "Invalid",
                f'{res.kind}.{res.group} "{name}" is invalid: metadata.resourceVersion: Invalid value: 0x0: '
                "must be specified for an update",
            )
        if check_rv and rv and rv != old_meta["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {res.qualified()} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                {"name": name, "group": res.group, "kind": res.plural},
            )
        if new_meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        if subresource == "status":
            # Only the status moves; everything else is the stored object's.
            merged = {**_without(old, "status"), **({"status": new["status"]} if "status" in new else {})}
        else:
            merged = {**new, "metadata": dict(new_meta)}
            if res.has_status:
                merged.pop("status", None)
                if "status" in old:
                    merged["status"] = old["status"]
            meta = merged["metadata"]
            # Server-owned metadata stays as stored; deletionTimestamp can only be set by DELETE.
            for fixed in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "namespace"):
                if fixed in old_meta:
                    meta[fixed] = old_meta[fixed]
                else:
                    meta.pop(fixed, None)
            meta["name"] = name
            if old_meta.get("deletionTimestamp"):
                # While deleting, finalizers may be removed but no new ones added.
                added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
                if added:
                    raise ApiError(
                        422,
                        "Forbidden",
                        f'{res.kind} "{name}" is being deleted: no new finalizers can be added: {sorted(added)}',
                    )
        merged["apiVersion"], merged["kind"] = res.api_version, res.kind
        merged["metadata"]["resourceVersion"] = old_meta["resourceVersion"]
        if res.generation and "generation" in old_meta:
            merged["metadata"]["generation"] = old_meta["generation"]
        merged = self._admit(res, merged, name)
        if merged == old:
            return old  # a no-op: no new resourceVersion, no event (as the API server)
        meta = merged["metadata"]
        if res.generation and "generation" in old_meta:
            changed = _without(merged, "metadata", "status") != _without(old, "metadata", "status")
            meta["generation"] = old_meta["generation"] + (1 if changed else 0)
        if meta.get("finalizers") == []:
            del meta["finalizers"]
        meta["resourceVersion"] = self._bump()
        key = (res.key, namespace, name)
        self.objects[key] = merged
        self._per_resource[res.key][(namespace, name)] = merged
        self._index_owners(key, merged, old)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(res, key, merged)
        else:
            self._emit(res, "MODIFIED", merged, old)
        return merged

    def _delete(self, res: Resource, namespace: str, name: str, options: Any) -> Obj:
        obj = self._existing(res, namespace, name)
        meta = obj["metadata"]
        options = options if isinstance(options, dict) else {}
        pre = options.get("preconditions") or {}
        if (pre.get("uid") and pre["uid"] != meta["uid"]) or (
            pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]
        ):
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {res.qualified()} "{name}": the precondition failed',
                {"name": name, "group": res.group, "kind": res.plural},
            )
        policy = options.get("propagationPolicy") or ("Orphan" if options.get("orphanDependents") else "Background")
        finalizers = list(meta.get("finalizers") or [])
        if policy == "Foreground" and self._dependents.get(meta["uid"]) and "foregroundDeletion" not in finalizers:
            finalizers.append("foregroundDeletion")
        if policy == "Orphan" and self._dependents.get(meta["uid"]) and "orphan" not in finalizers:
            finalizers.append("orphan")
        if finalizers:
            if meta.get("deletionTimestamp") and finalizers == list(meta.get("finalizers") or []):
                return obj  # already being deleted
            updated = copy.deepcopy(obj)
            updated["metadata"]["finalizers"] = finalizers
            updated["metadata"].setdefault("deletionTimestamp", _now())
            updated["metadata"].setdefault("deletionGracePeriodSeconds", 0)
            updated["metadata"]["resourceVersion"] = self._bump()
            key = (res.key, namespace, name)
            self.objects[key] = updated
            self._per_resource[res.key][(namespace, name)] = updated
            self._emit(res, "MODIFIED", updated, obj)
            if {"foregroundDeletion", "orphan"} & set(finalizers):
                self._schedule_gc(meta["uid"])
            return updated
        self._remove(res, (res.key, namespace, name), obj)
        return obj

    def _remove(self, res: Resource, key: Key, obj: Obj) -> None:
        """The object is gone for good: DELETED, then its dependents are collected."""
        self.objects.pop(key, None)
        self._per_resource[res.key].pop((key[1], key[2]), None)
        uid = obj["metadata"]["uid"]
        self._by_uid.pop(uid, None)
        self._index_owners(key, None, obj)
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._bump()
        self._emit(res, "DELETED", gone, obj)
        if self._dependents.get(uid):
            self._schedule_gc(uid)

    # -- garbage collection ------------------------------------------------------------------------

    def _index_owners(self, key: Key, new: Obj | None, old: Obj | None) -> None:
        old_uids = {r.get("uid") for r in (old or {}).get("metadata", {}).get("ownerReferences") or []}
        new_uids = {r.get("uid") for r in (new or {}).get("metadata", {}).get("ownerReferences") or []}
        for uid in old_uids - new_uids:
            self._dependents[uid].discard(key)
            if not self._dependents[uid]:
                del self._dependents[uid]
        for uid in new_uids - old_uids:
            if uid:
                self._dependents[uid].add(key)

    def _gc_dangling(self, key: Key, obj: Obj) -> None:
        """A new object whose owners are all absent is collected (as the garbage collector does)."""
        refs = obj["metadata"].get("ownerReferences") or []
        if refs and all(r.get("uid") not in self._by_uid for r in refs):
            for ref in refs:
                self._schedule_gc(ref.get("uid", ""))

    def _schedule_gc(self, owner_uid: str) -> None:
        if owner_uid in self._gc_pending:
            return
        self._gc_pending.add(owner_uid)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._gc_pending.discard(owner_uid)
            self._collect(owner_uid)
            return
        # Asynchronous as the real collector: the owner's DELETED event comes first.
        loop.call_soon(self._collect, owner_uid)

    def _collect(self, owner_uid: str) -> None:
        self._gc_pending.discard(owner_uid)
        owner_key = self._by_uid.get(owner_uid)
        owner = self.objects.get(owner_key) if owner_key else None
        owner_finalizers = set((owner or {}).get("metadata", {}).get("finalizers") or [])
        deleting = bool(owner and owner["metadata"].get("deletionTimestamp"))
        for dep_key in sorted(self._dependents.get(owner_uid, set())):
            dep = self.objects.get(dep_key)
            if dep is None:
                continue
            res = self.resources[dep_key[0]]
            refs = dep["metadata"].get("ownerReferences") or []
            if owner is not None and deleting and "orphan" in owner_finalizers:
                kept = [r for r in refs if r.get("uid") != owner_uid]
                patch = {"metadata": {"ownerReferences": kept or None}}
                self._update(res, dep_key[1], dep_key[2], _merge_patch(dep, patch), None, check_rv=False)
                continue
            if owner is not None and not (deleting and "foregroundDeletion" in owner_finalizers):
                continue  # the owner exists and is not being deleted in the foreground
            others = [r for r in refs if r.get("uid") != owner_uid and r.get("uid") in self._by_uid]
            if others:
                kept = [r for r in refs if r.get("uid") != owner_uid]
                self._update(
                    res,
                    dep_key[1],
                    dep_key[2],
                    _merge_patch(dep, {"metadata": {"ownerReferences": kept}}),
                    None,
                    check_rv=False,
                )
                continue
            if not dep["metadata"].get("deletionTimestamp"):
                self._delete(res, dep_key[1], dep_key[2], {"propagationPolicy": "Background"})
        if owner is not None and owner_key is not None and deleting:
            # Foreground/orphan deletion ends when no dependent is left.
            left = [k for k in self._dependents.get(owner_uid, set()) if k in self.objects]
            flags = {"foregroundDeletion", "orphan"} & owner_finalizers
            if flags and (not left or "orphan" in flags):
                kept = [f for f in owner["metadata"].get("finalizers") or [] if f not in flags]
                res = self.resources[owner_key[0]]
                self._update(
                    res,
                    owner_key[1],
                    owner_key[2],
                    _merge_patch(owner, {"metadata": {"finalizers": kept or None}}),
                    None,
                    check_rv=False,
                )

    # -- watches -----------------------------------------------------------------------------------

    def _emit(self, res: Resource, kind: str, obj: Obj, old: Obj | None) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        self._logs[res.key].append((rv, kind, obj))
        for listener in self.listeners.get(res.key, ()):
            try:
                asyncio.get_running_loop().call_soon(listener, kind, obj, old)
            except RuntimeError:
                listener(kind, obj, old)
        for w in self._watchers.get(res.key, ()):
            now_in, was_in = w.selects(obj), w.selects(old)
            if kind == "DELETED":
                if was_in or now_in:
                    w.queue.put_nowait(("DELETED", obj))
            elif now_in and not was_in and old is not None:
                w.queue.put_nowait(("ADDED", obj))  # entered the selection
            elif now_in:
                w.queue.put_nowait((kind, obj))
            elif was_in:
                w.queue.put_nowait(("DELETED", obj))  # left the selection
        # A foreground-deleting owner waits for its dependents: re-check it when one goes.
        if kind == "DELETED":
            for ref in obj["metadata"].get("ownerReferences") or []:
                owner_key = self._by_uid.get(ref.get("uid", ""))
                if owner_key and self.objects[owner_key]["metadata"].get("deletionTimestamp"):
                    self._schedule_gc(ref["uid"])

    async def _watch(
        self, request: aiohttp.web.BaseRequest, res: Resource, namespace: str, name: str | None
    ) -> aiohttp.web.StreamResponse:
        q = request.query
        try:
            watcher = _Watcher(
                res, namespace, label_selector(q.get("labelSelector")), field_selector(q.get("fieldSelector")), name
            )
        except SelectorError as e:
            raise ApiError(400, "BadRequest", str(e)) from None
        since = q.get("resourceVersion", "")
        initial = q.get("sendInitialEvents") == "true" or since in ("", "0")
        bookmarks = q.get("allowWatchBookmarks") == "true"
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        backlog: list[tuple[str, Obj]] = []
        gone = False
        if initial:
            backlog = [("ADDED", o) for o in self._per_resource[res.key].values() if watcher.selects(o)]
        else:
            try:
                start = int(since)
            except ValueError:
                raise ApiError(400, "BadRequest", f"invalid resourceVersion {since!r}") from None
            events = self._logs[res.key]
            if start > self._revision:
                raise ApiError(504, "Timeout", f"Too large resource version: {start}, current: {self._revision}")
            if events and events[0][0] > start + 1 and len(events) == events.maxlen:
                gone = True
            else:
                for rv, kind, obj in events:
                    if rv > start and watcher.selects(obj):
                        backlog.append((kind, obj))
        self._watchers[res.key].append(watcher)  # registered before any await: no event is missed
        resp = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            if gone:
                err = ApiError(410, "Expired", f"too old resource version: {since} ({events[0][0] - 1})")
                await resp.write(json.dumps({"type": "ERROR", "object": err.status()}).encode() + b"\n")
                return resp
            for kind, obj in backlog:
                await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            if initial and q.get("sendInitialEvents") == "true":
                await resp.write(self._bookmark(res, initial_end=True))
            deadline = time.monotonic() + timeout if timeout else None
            while True:
                wait = self.bookmark_seconds if bookmarks else None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wait = min(wait, left) if wait else left
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    if bookmarks:
                        await resp.write(self._bookmark(res))
                    continue
                if item is None:
                    break
                kind, obj = item
                await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watchers[res.key].remove(watcher)
        return resp

    def _bookmark(self, res: Resource, initial_end: bool = False) -> bytes:
        meta: Obj = {"resourceVersion": str(self._revision)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return (
            json.dumps(
                {"type": "BOOKMARK", "object": {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta}}
            ).encode()
            + b"\n"
        )

    def close_watches(self) -> None:
        """End every open watch (as an API server restart would)."""
        for watchers in self._watchers.values():
            for w in watchers:
                w.queue.put_nowait(None)

    # -- lists -------------------------------------------------------------------------------------

    def _list(self, res: Resource, namespace: str, query: Mapping[str, str]) -> Obj:
        try:
            labels = label_selector(query.get("labelSelector"))
            fields = field_selector(query.get("fieldSelector"))
        except SelectorError as e:
            raise ApiError(400, "BadRequest", str(e)) from None
        items = [
            obj
            for (ns, _), obj in sorted(self._per_resource[res.key].items())
            if (not namespace or ns == namespace) and labels(obj["metadata"].get("labels") or {}) and fields(obj)
        ]
        meta: Obj = {"resourceVersion": str(self._revision)}
        cont = query.get("continue")
        if cont:
            start = json.loads(cont)
            items = [o for o in items if (o["metadata"].get("namespace", ""), o["metadata"]["name"]) > tuple(start)]
        limit = int(query.get("limit") or 0)
        if limit and len(items) > limit:
            items = items[:limit]
            last = items[-1]["metadata"]
            meta["continue"] = json.dumps([last.get("namespace", ""), last["name"]])
            meta["remainingItemCount"] = 0
        return {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": meta, "items": items}

    # -- HTTP --------------------------------------------------------------------------------------

    async def __call__(self, request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        try:
            return await self._serve(request)
        except ApiError as e:
            return aiohttp.web.json_response(e.status(), status=e.code)
        except Exception as e:  # a bug here must reach the client as a 500, not hang it
            log.exception("emulator failure on %s %s", request.method, request.path)
            err = ApiError(500, "InternalError", f"emulator error: {e!r}")
            return aiohttp.web.json_response(err.status(), status=500)

    async def _serve(self, request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        path = request.path.strip("/")
        parts = path.split("/") if path else []
        if parts[:1] == ["emulator"]:
            return self._serve_emulator(request, parts[1:])
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return await self._discovery(request, parts)
        if not rest:
            return await self._discovery(request, parts)
        namespace = ""
        core = (group, version) == ("", "v1")
        # /namespaces/<ns>/<plural>/...; but /api/v1/namespaces[/<name>[/status|/finalize]] is the Namespace.
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (core and len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        plural = rest[0]
        name = rest[1] if len(rest) >= 2 else None
        subresource = "/".join(rest[2:]) or None
        res = self._by_group_version.get((group, version), {}).get(plural)
        if res is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        method = request.method
        body: Any = None
        raw = await request.read()
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                raise ApiError(400, "BadRequest", "the body of the request is not valid JSON") from None
        if self.request_hooks:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, "get")
            if method == "GET":
                verb = "watch" if request.query.get("watch") in ("true", "1") else ("list" if name is None else "get")
            for hook in list(self.request_hooks):
                hook(verb, res.key, name)
        if subresource == "status" and not res.has_status:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        if subresource and subresource != "status":
            handler = self.subresource_handlers.get((res.group, res.plural, subresource))
            if handler is None or name is None:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
            self.requests[(method.lower(), f"{res.key}/{subresource}")] += 1
            self.subresource_calls.append((res.group, res.plural, subresource, namespace, name))
            code, payload = handler(self, res, namespace, name, body)
            return aiohttp.web.json_response(payload, status=code)
        if method == "GET" and request.query.get("watch") in ("true", "1"):
            self.requests[("watch", res.key)] += 1
            return await self._watch(request, res, namespace, name)
        if method == "GET":
            if name is None:
                self.requests[("list", res.key)] += 1
                return aiohttp.web.json_response(self._list(res, namespace, request.query))
            self.requests[("get", res.key + ("/status" if subresource else ""))] += 1
            return aiohttp.web.json_response(self._existing(res, namespace, name))
        if method == "POST" and name is None:
            self.requests[("create", res.key)] += 1
            return aiohttp.web.json_response(self._create(res, namespace, body, from_request=True), status=201)
        if name is None:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a collection here")
        if method == "PUT":
            self.requests[("update", res.key + ("/status" if subresource else ""))] += 1
            return aiohttp.web.json_response(
                self._update(res, namespace, name, body, subresource, check_rv=True, require_rv=True)
            )
        if method == "PATCH":
            self.requests[("patch", res.key + ("/status" if subresource else ""))] += 1
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
            current = self._existing(res, namespace, name)
            if ctype == "application/json-patch+json":
                if not isinstance(body, list):
                    raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
                try:
                    patched = jsonpatch.apply_patch(current, body)
                except jsonpatch.JsonPatchTestFailed as e:
                    raise ApiError(
                        422, "Invalid", f"the server rejected our request due to an error in our request: {e}"
                    ) from None
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                    raise ApiError(422, "Invalid", f"the patch could not be applied: {e}") from None
                # A JSON patch carries its resourceVersion check as a `test` op, not in the result.
                return aiohttp.web.json_response(
                    self._update(res, namespace, name, patched, subresource, check_rv=False)
                )
            if ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
                patched = _merge_patch(current, body)
                return aiohttp.web.json_response(
                    self._update(res, namespace, name, patched, subresource, check_rv=True)
                )
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: "
                f"application/json-patch+json, application/merge-patch+json (got {ctype!r})",
            )
        if method == "DELETE":
            self.requests[("delete", res.key)] += 1
            return aiohttp.web.json_response(self._delete(res, namespace, name, body))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")

    def _serve_emulator(self, request: aiohttp.web.BaseRequest, parts: list[str]) -> aiohttp.web.StreamResponse:
        if parts == ["stats"] and request.method == "GET":
            return aiohttp.web.json_response(self.stats())
        if parts == ["stats"] and request.method == "DELETE":
            self.reset_stats()
            return aiohttp.web.json_response({})
        if parts == ["subresource-calls"]:
            return aiohttp.web.json_response([list(c) for c in self.subresource_calls])
        raise ApiError(404, "NotFound", "unknown emulator endpoint")

    async def _discovery(self, request: aiohttp.web.BaseRequest, parts: list[str]) -> aiohttp.web.StreamResponse:
        self.requests[("discovery", "/" + "/".join(parts))] += 1
        sc = self.scaffold
        payload: Any
        try:
            if not parts:
                payload = await sc._serve_root(kmock.Request())
            elif parts == ["version"]:
                payload = await sc._serve_server_version(kmock.Request())
                payload = {**payload, "minor": "31", "gitVersion": "v1.31.0-cyberdesk-emulator"}
            elif parts == ["api"]:
                payload = await sc._serve_api(kmock.Request())
            elif parts == ["apis"]:
                payload = await sc._serve_apis(kmock.Request())
            elif parts[0] == "apis" and len(parts) == 2:
                payload = await sc._serve_group(kmock.Request(resource=kmock.resource(group=parts[1])))
            elif parts[0] == "apis" and len(parts) == 3:
                payload = _subresource_entries(
                    await sc._serve_version(kmock.Request(resource=kmock.resource(group=parts[1], version=parts[2])))
                )
            elif parts == ["api", "v1"]:
                payload = _subresource_entries(
                    await sc._serve_version(kmock.Request(resource=kmock.resource(group="", version="v1")))
                )
            else:
                raise ApiError(
                    404, "NotFound", f"the server could not find the requested resource (/{'/'.join(parts)})"
                )
        except kmock.KubernetesNotFoundError:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource (/{'/'.join(parts)})"
            ) from None
        return aiohttp.web.json_response(payload)
