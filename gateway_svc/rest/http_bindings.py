"""The REST route table: the HTTP bindings of the RPCs, built at start-up from their `google.api.http` options.

This is where a REST request finds its RPC (`BindingTable.match`). No route is written by hand:
every binding (the rule itself and its `additional_bindings`) of every method of the given services
becomes an `HttpBinding`. Bindings are checked against the messages when the
table is built (each variable and the body name a real field of the right kind), so a broken
annotation stops the gateway at start-up instead of failing a request later.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

from google.api import annotations_pb2, http_pb2  # type: ignore[import-untyped]
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from gateway_svc.rest.path_templates import (
    PathDecodeError,
    PathTemplate,
    TemplateError,
    TemplateMatch,
    TemplateMatcher,
    parse,
)

# File bindings capture the path inside the instance with `{path=**}`: the captured value has no
# leading "/" (it follows "/files/"), while the RPC wants an absolute path. The prefix is added per
# binding and field here, explicitly, rather than guessed from a field's name.
ABSOLUTE_PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "cyberdesk.v1.FilesystemService.DownloadFile": ("path",),
    "cyberdesk.v1.FilesystemService.UploadFile": ("header.path",),
}

# Server-streaming methods whose HTTP response is the raw bytes of one field of each message (a
# file download) rather than a stream of JSON objects.
RAW_RESPONSE_FIELDS: dict[str, str] = {
    "cyberdesk.v1.FilesystemService.DownloadFile": "chunk",
}


# Services outside cyberdesk.v1 that the REST face serves too, for operators (admin-scoped keys).
# The gateway serves them itself rather than forwarding them (gateway_svc/keys_api.py).
OPERATOR_SERVICES = frozenset({"cyberdesk.internal.v1.AuthService"})


def public_modules() -> list[ModuleType]:
    """The generated modules of the public API, cyberdesk.v1."""
    from cyberdesk_proto.v1 import billing_pb2, desktop_pb2, filesystem_pb2, instance_pb2, ports_pb2, process_pb2

    return [instance_pb2, process_pb2, filesystem_pb2, desktop_pb2, ports_pb2, billing_pb2]


def default_modules() -> list[ModuleType]:
    """What the REST face serves: cyberdesk.v1 and the operators' key management (AuthService)."""
    from cyberdesk_proto.internal.v1 import auth_pb2

    return [*public_modules(), auth_pb2]


@dataclass(frozen=True)
class HttpBinding:
    """One HTTP binding of one RPC."""

    service: str  # full name, e.g. "cyberdesk.v1.InstanceService"
    method: str  # short name, e.g. "CreateInstance"
    http_method: str  # "GET", "POST", ... or a custom verb
    template: PathTemplate
    body: str  # "" (no body), "*" or a top-level field name
    response_body: str  # "" (whole message) or a top-level field name
    request_descriptor: Descriptor
    response_descriptor: Descriptor
    client_streaming: bool
    server_streaming: bool
    binding_index: int  # 0 for the rule itself, 1.. for its additional_bindings
    absolute_path_fields: tuple[str, ...] = ()
    raw_response_field: str = ""

    @property
    def full_method(self) -> str:
        """The gRPC method path, e.g. "/cyberdesk.v1.InstanceService/CreateInstance"."""
        return f"/{self.service}/{self.method}"

    @property
    def qualified_name(self) -> str:
        """e.g. "cyberdesk.v1.InstanceService.CreateInstance"."""
        return f"{self.service}.{self.method}"

    @property
    def raw_request_field(self) -> str:
        """The bytes field that takes the raw HTTP body (`body: "chunk"` on an upload), or ""."""
        if self.body in ("", "*"):
            return ""
        f = self.request_descriptor.fields_by_name[self.body]
        return self.body if f.type == FieldDescriptor.TYPE_BYTES and not _is_repeated(f) else ""

    @property
    def websocket(self) -> bool:
        """Bidirectional streams are served over WebSocket."""
        return self.client_streaming and self.server_streaming

    def request_class(self) -> type[Message]:
        """The generated class of the request message."""
        return message_factory.GetMessageClass(self.request_descriptor)

    def new_request(self) -> Message:
        """An empty request message."""
        return self.request_class()()

    def response_class(self) -> type[Message]:
        """The generated class of the response message."""
        return message_factory.GetMessageClass(self.response_descriptor)


def _is_repeated(f: FieldDescriptor) -> bool:
    return bool(f.is_repeated)


def resolve_field_path(desc: Descriptor, path: str) -> list[FieldDescriptor]:
    """The chain of fields a dotted path names; KeyError naming the missing part."""
    chain: list[FieldDescriptor] = []
    for i, name in enumerate(path.split(".")):
        f = desc.fields_by_name.get(name)
        if f is None:
            raise KeyError(f"{desc.full_name} has no field {name!r} (in {path!r})")
        chain.append(f)
        if i < len(path.split(".")) - 1:
            if f.message_type is None or _is_repeated(f):
                raise KeyError(f"{desc.full_name}.{name} is not a singular message (in {path!r})")
            desc = f.message_type
    return chain


def _pattern(rule: http_pb2.HttpRule) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise TemplateError("an http rule without a pattern")
    if kind == "custom":
        return rule.custom.kind.upper(), rule.custom.path
    return kind.upper(), str(getattr(rule, kind))


def _bindings_of_method(service: ServiceDescriptor, method: MethodDescriptor) -> list[HttpBinding]:
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return []
    rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
    http_rules = [rule, *rule.additional_bindings]
    qualified = f"{service.full_name}.{method.name}"
    out: list[HttpBinding] = []
    for i, http_rule in enumerate(http_rules):
        where = f"{qualified} (binding {i})"
        if i > 0 and http_rule.additional_bindings:
            raise TemplateError(f"{where}: additional_bindings cannot nest")
        http_method, path = _pattern(http_rule)
        try:
            template = parse(path)
        except TemplateError as exc:
            raise TemplateError(f"{where}: {exc}") from None
        req = method.input_type
        for var in template.variables:
            try:
                chain = resolve_field_path(req, var.field_path)
            except KeyError as exc:
                raise TemplateError(f"{where}: path variable: {exc.args[0]}") from None
            leaf = chain[-1]
            if _is_repeated(leaf) or leaf.message_type is not None:
                raise TemplateError(f"{where}: path variable {var.field_path!r} must be a singular scalar field")
        if http_rule.body not in ("", "*") and http_rule.body not in req.fields_by_name:
            raise TemplateError(f"{where}: body {http_rule.body!r} is not a field of {req.full_name}")
        resp = method.output_type
        if http_rule.response_body and http_rule.response_body not in resp.fields_by_name:
            raise TemplateError(
                f"{where}: response_body {http_rule.response_body!r} is not a field of {resp.full_name}"
            )
        out.append(
            HttpBinding(
                service=service.full_name,
                method=method.name,
                http_method=http_method,
                template=template,
                body=http_rule.body,
                response_body=http_rule.response_body,
                request_descriptor=req,
                response_descriptor=resp,
                client_streaming=bool(method.client_streaming),
                server_streaming=bool(method.server_streaming),
                binding_index=i,
                absolute_path_fields=ABSOLUTE_PATH_FIELDS.get(qualified, ()),
                raw_response_field=RAW_RESPONSE_FIELDS.get(qualified, ""),
            )
        )
    return out


@dataclass(frozen=True)
class BindingMatch:
    """A request's binding and its path variables (decoded, by field path)."""

    binding: HttpBinding
    variables: dict[str, str]


@dataclass
class BindingTable:
    """All bindings, and a compiled matcher over them."""

    bindings: list[HttpBinding]
    services: list[ServiceDescriptor]
    _matcher: TemplateMatcher[HttpBinding] = field(default_factory=TemplateMatcher)

    def __post_init__(self) -> None:
        for binding in self.bindings:
            try:
                self._matcher.add(binding.http_method, binding.template, binding)
            except TemplateError as exc:
                raise TemplateError(f"{binding.qualified_name}: {exc}") from None

    def match(self, http_method: str, path: str) -> BindingMatch | None:
        """The binding for an HTTP method and a raw path (no query string), or None.

        HEAD falls back to GET. PathDecodeError when a variable's percent-encoding is malformed.
        """
        found: TemplateMatch[HttpBinding] | None = self._matcher.match(http_method, path)
        if found is None and http_method.upper() == "HEAD":
            found = self._matcher.match("GET", path)
        if found is None:
            return None
        return BindingMatch(found.payload, found.variables)

    def allowed_methods(self, path: str) -> list[str]:
        """The HTTP methods that have a binding for `path` (for a 405 and its Allow header)."""
        allowed = []
        for m in self._matcher.methods():
            try:
                if self._matcher.match(m, path) is not None:
                    allowed.append(m)
            except PathDecodeError:
                allowed.append(m)
        return allowed

    def for_method(self, qualified_name: str) -> list[HttpBinding]:
        """The bindings of one RPC, e.g. "cyberdesk.v1.InstanceService.ListSnapshots"."""
        return [r for r in self.bindings if r.qualified_name == qualified_name]


def build_binding_table(sources: Iterable[ModuleType | FileDescriptor] | None = None) -> BindingTable:
    """The binding table of every service in the given generated modules (default: `default_modules()`)."""
    services: list[ServiceDescriptor] = []
    for src in default_modules() if sources is None else sources:
        fd: FileDescriptor = src.DESCRIPTOR if isinstance(src, ModuleType) else src
        services.extend(fd.services_by_name.values())
    return BindingTable(bindings=list(_iter_bindings(services)), services=services)


def _iter_bindings(services: Sequence[ServiceDescriptor]) -> Iterable[HttpBinding]:
    for service in services:
        for method in service.methods:
            yield from _bindings_of_method(service, method)
