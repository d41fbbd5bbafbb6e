"""The OpenAPI 3.1 document of the REST face, generated from the protos and their `google.api.http` rules.

`build_document(table, comments)` returns the document as a dict. Paths come from the binding table
(additional bindings included), schemas from the messages in the proto3 JSON mapping (int64 as a
string, bytes as base64, enums by name, Timestamp as an RFC 3339 string, Duration as "1.5s", maps
as objects), descriptions from the proto comments. The Python descriptors carry no comments, so
`comments_from_descriptor_set` reads them from a FileDescriptorSet built with source info (see
tools/gen_openapi.py, which writes the committed document).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from gateway_svc.rest.http_bindings import OPERATOR_SERVICES, BindingTable, HttpBinding, build_binding_table
from gateway_svc.rest.json_mapping import QUERY_MESSAGE_TYPES, is_map, is_repeated

REF = "#/components/schemas/"
STATUS_SCHEMA = "google.rpc.Status"
OPENAPI_METHODS = {"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"}
# The tag every operation of an operator service carries besides its service's, so that a reader
# (or a generated client) can set apart what needs an admin key.
OPERATOR_TAG = "operator"
OPERATOR_TAG_DESCRIPTION = (
    "Operator routes: they need an API key with the `admin` scope; any other key is PERMISSION_DENIED "
    "(403). Served by the gateway itself."
)

_INT32 = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32}
_UINT32 = {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32}
_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64}
_UINT64 = {FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64}


def comments_from_descriptor_set(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, str]:
    """Leading comments by full name (messages, fields, enums, values, services, methods)."""
    out: dict[str, str] = {}
    for file in fds.file:
        by_path = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}
        prefix = f"{file.package}." if file.package else ""

        def put(name: str, path: tuple[int, ...], by_path: dict[tuple[int, ...], str] = by_path) -> None:
            text = by_path.get(path, "")
            lines = [line.strip() for line in text.strip().splitlines()]
            if lines:
                out[name] = "\n".join(lines)

        def enum(e: descriptor_pb2.EnumDescriptorProto, name: str, path: tuple[int, ...]) -> None:
            put(name, path)
            for i, v in enumerate(e.value):
                put(f"{name}.{v.name}", (*path, 2, i))

        def message(m: descriptor_pb2.DescriptorProto, name: str, path: tuple[int, ...]) -> None:
            put(name, path)
            for i, f in enumerate(m.field):
                put(f"{name}.{f.name}", (*path, 2, i))
            for i, n in enumerate(m.nested_type):
                message(n, f"{name}.{n.name}", (*path, 3, i))
            for i, e in enumerate(m.enum_type):
                enum(e, f"{name}.{e.name}", (*path, 4, i))

        for i, m in enumerate(file.message_type):
            message(m, prefix + m.name, (4, i))
        for i, e in enumerate(file.enum_type):
            enum(e, prefix + e.name, (5, i))
        for i, s in enumerate(file.service):
            put(prefix + s.name, (6, i))
            for j, meth in enumerate(s.method):
                put(f"{prefix}{s.name}.{meth.name}", (6, i, 2, j))
    return out


def _first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    end = flat.find(". ")
    return flat if end < 0 else flat[: end + 1]


class _Schemas:
    """Collects components/schemas while paths are built."""

    def __init__(self, comments: Mapping[str, str]) -> None:
        self.comments = comments
        self.schemas: dict[str, Any] = {}

    def describe(self, schema: dict[str, Any], full_name: str, extra: str = "") -> dict[str, Any]:
        text = "\n\n".join(t for t in (self.comments.get(full_name, ""), extra) if t)
        if text:
            schema["description"] = text
        return schema

    def scalar(self, f: FieldDescriptor) -> dict[str, Any]:
        t = f.type
        if t in _INT32:
            return {"type": "integer", "format": "int32"}
        if t in _UINT32:
            return {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 4294967295}
        if t in _INT64:
            return {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
        if t in _UINT64:
            return {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
        if t == FieldDescriptor.TYPE_DOUBLE:
            return {"type": "number", "format": "double"}
        if t == FieldDescriptor.TYPE_FLOAT:
            return {"type": "number", "format": "float"}
        if t == FieldDescriptor.TYPE_BOOL:
            return {"type": "boolean"}
        if t == FieldDescriptor.TYPE_BYTES:
            return {"type": "string", "format": "byte", "contentEncoding": "base64"}
        if t == FieldDescriptor.TYPE_ENUM and f.enum_type is not None:
            return self.enum_ref(f.enum_type)
        if f.message_type is not None:
            return self.message_ref(f.message_type)
        return {"type": "string"}

    def enum_ref(self, enum: EnumDescriptor) -> dict[str, Any]:
        name = enum.full_name
        if name not in self.schemas:
            lines = [f"- `{v.name}` ({v.number}): {self.comments.get(f'{name}.{v.name}', '')}" for v in enum.values]
            extra = "Given by name; the number is accepted on input.\n\n" + "\n".join(lines)
            self.schemas[name] = self.describe(
                {"type": "string", "enum": [v.name for v in enum.values]}, _enum_comment_key(enum), extra
            )
        return {"$ref": REF + name}

    def well_known(self, name: str) -> dict[str, Any] | None:
        scalars: dict[str, dict[str, Any]] = {
            "google.protobuf.DoubleValue": {"type": ["number", "null"], "format": "double"},
            "google.protobuf.FloatValue": {"type": ["number", "null"], "format": "float"},
            "google.protobuf.Int64Value": {"type": ["string", "null"], "format": "int64"},
            "google.protobuf.UInt64Value": {"type": ["string", "null"], "format": "uint64"},
            "google.protobuf.Int32Value": {"type": ["integer", "null"], "format": "int32"},
            "google.protobuf.UInt32Value": {"type": ["integer", "null"], "format": "uint32"},
            "google.protobuf.BoolValue": {"type": ["boolean", "null"]},
            "google.protobuf.StringValue": {"type": ["string", "null"]},
            "google.protobuf.BytesValue": {"type": ["string", "null"], "contentEncoding": "base64"},
            "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
            "google.protobuf.Duration": {
                "type": "string",
                "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$",
                "examples": ["1.5s"],
            },
            "google.protobuf.FieldMask": {"type": "string", "examples": ["fieldA,fieldB.subField"]},
            "google.protobuf.Struct": {"type": "object"},
            "google.protobuf.Value": {},
            "google.protobuf.ListValue": {"type": "array"},
            "google.protobuf.Empty": {"type": "object"},
            "google.protobuf.Any": {
                "type": "object",
                "properties": {"@type": {"type": "string"}},
                "required": ["@type"],
            },
        }
        found = scalars.get(name)
        return dict(found) if found is not None else None

    def message_ref(self, desc: Descriptor) -> dict[str, Any]:
        wkt = self.well_known(desc.full_name)
        if wkt is not None:
            return wkt
        name = desc.full_name
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder: recursive messages refer to themselves
            self.schemas[name] = self.message_schema(desc)
        return {"$ref": REF + name}

    def message_schema(self, desc: Descriptor, skip: Iterable[str] = ()) -> dict[str, Any]:
        skipped = set(skip)
        props = {f.json_name: self.field(f) for f in desc.fields if f.name not in skipped}
        notes = []
        for oneof in desc.oneofs:
            members = ", ".join(f"`{f.json_name}`" for f in oneof.fields)
            notes.append(f"At most one of {members} is set (oneof `{oneof.name}`).")
        schema: dict[str, Any] = {"type": "object", "properties": props}
        return self.describe(schema, desc.full_name, " ".join(notes))

    def field(self, f: FieldDescriptor) -> dict[str, Any]:
        if is_map(f):
            entry: Any = f.message_type
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            schema: dict[str, Any] = {"type": "object", "additionalProperties": self.scalar(value)}
            if key.type != FieldDescriptor.TYPE_STRING:
                is_bool = key.type == FieldDescriptor.TYPE_BOOL
                schema["propertyNames"] = {"pattern": "^(true|false)$" if is_bool else "^-?[0-9]+$"}
        elif is_repeated(f):
            schema = {"type": "array", "items": self.scalar(f)}
        else:
            schema = self.scalar(f)
        extra = ""
        if f.containing_oneof is not None:
            others = [o.json_name for o in f.containing_oneof.fields if o.name != f.name]
            extra = (
                f"Member of oneof `{f.containing_oneof.name}`; excludes " + ", ".join(f"`{o}`" for o in others) + "."
            )
        return self.describe(schema, f.full_name, extra)

    def status(self) -> dict[str, Any]:
        if STATUS_SCHEMA not in self.schemas:
            self.schemas[STATUS_SCHEMA] = {
                "type": "object",
                "description": "An error, in the form of google.rpc.Status.",
                "properties": {
                    "code": {"type": "integer", "format": "int32", "description": "The google.rpc.Code number."},
                    "message": {"type": "string", "description": "What went wrong, for a person."},
                    "details": {
                        "type": "array",
                        "description": "Typed details, e.g. google.rpc.RetryInfo or google.rpc.BadRequest.",
                        "items": self.well_known("google.protobuf.Any"),
                    },
                },
                "required": ["code", "message"],
            }
        return {"$ref": REF + STATUS_SCHEMA}


def _enum_comment_key(enum: EnumDescriptor) -> str:
    return enum.full_name


def _param_names(binding: HttpBinding) -> dict[str, str]:
    """Path parameter names: the last identifier of each field path, unless two would clash."""
    last = [v.field_path.rsplit(".", 1)[-1] for v in binding.template.variables]
    if len(set(last)) == len(last):
        return {v.field_path: n for v, n in zip(binding.template.variables, last, strict=True)}
    return {v.field_path: v.field_path for v in binding.template.variables}


def _leaf(desc: Descriptor, path: str) -> FieldDescriptor:
    f: Any = None
    for name in path.split("."):
        f = desc.fields_by_name[name]
        if f.message_type is not None:
            desc = f.message_type
    assert f is not None
    return f  # type: ignore[no-any-return]


def _query_params(
    s: _Schemas, desc: Descriptor, prefix: str, bound: set[str], seen: tuple[str, ...]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in desc.fields:
        proto_path = f"{prefix}{f.name}"
        if any(b == proto_path or b.startswith(proto_path + ".") for b in bound):
            if f.message_type is not None and not is_repeated(f) and proto_path not in bound:
                sub = f.message_type
                out += _query_params(s, sub, proto_path + ".", bound, (*seen, sub.full_name))
            continue
        name = ".".join(filter(None, [_json_prefix(desc, prefix), f.json_name]))
        msg = f.message_type
        param: dict[str, Any]
        if is_map(f):
            param = {"name": name, "in": "query", "style": "deepObject", "explode": True, "schema": s.field(f)}
        elif msg is not None and msg.full_name not in QUERY_MESSAGE_TYPES:
            if is_repeated(f) or msg.full_name in seen:
                continue  # a repeated or recursive message cannot be written as query parameters
            out += _query_params(s, msg, proto_path + ".", bound, (*seen, msg.full_name))
            continue
        else:
            param = {"name": name, "in": "query", "schema": s.field(f)}
            if is_repeated(f):
                param["style"], param["explode"] = "form", True
        if "description" in param["schema"]:
            param["description"] = param["schema"].pop("description")
        out.append(param)
    return out


def _json_prefix(desc: Descriptor, prefix: str) -> str:
    # The prefix is in proto names; parameters are documented with JSON names (both are accepted).
    del desc
    return ".".join(_camel(p) for p in prefix.rstrip(".").split(".")) if prefix else ""


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _operation(binding: HttpBinding, s: _Schemas) -> dict[str, Any]:
    service_short = binding.service.rsplit(".", 1)[-1]
    doc = s.comments.get(binding.qualified_name, "")
    op: dict[str, Any] = {
        "operationId": f"{service_short}_{binding.method}"
        + (f"_{binding.binding_index}" if binding.binding_index else ""),
        "tags": [service_short, OPERATOR_TAG] if binding.service in OPERATOR_SERVICES else [service_short],
    }
    if doc:
        op["summary"] = _first_sentence(doc)
        op["description"] = doc
    req = binding.request_descriptor
    names = _param_names(binding)
    params: list[dict[str, Any]] = []
    for var in binding.template.variables:
        leaf = _leaf(req, var.field_path)
        schema = s.scalar(leaf)
        text = s.comments.get(leaf.full_name, "")
        notes = [f"Sets `{var.field_path}`."]
        if var.multi_segment:
            notes.append("May contain '/'.")
        if var.field_path in binding.absolute_path_fields:
            notes.append("Written without the leading '/', which the gateway adds.")
        params.append(
            {
                "name": names[var.field_path],
                "in": "path",
                "required": True,
                "description": " ".join([text, *notes]).strip(),
                "schema": {k: v for k, v in schema.items() if k != "description"},
            }
        )
    bound = set(binding.template.field_paths)
    if binding.body != "*":
        if binding.body:
            bound.add(binding.body)
            # The other members of the body's oneof that no path variable fills (an upload's
            # trailer) are later messages of the stream, never query parameters of the first.
            body = req.fields_by_name[binding.body]
            if body.containing_oneof is not None:
                bound |= {
                    f.name
                    for f in body.containing_oneof.fields
                    if not any(b == f.name or b.startswith(f.name + ".") for b in bound)
                }
        params += _query_params(s, req, "", bound, (req.full_name,))
    if params:
        op["parameters"] = params

    # Request body.
    if binding.raw_request_field:
        op["requestBody"] = {
            "required": True,
            "description": f"The raw bytes of `{binding.raw_request_field}`, streamed.",
            "content": {
                "application/octet-stream": {
                    "schema": {"type": "string", "contentMediaType": "application/octet-stream"}
                }
            },
        }
    elif binding.body:
        top_bound = {p.split(".")[0] for p in binding.template.field_paths}
        whole = binding.body == "*"
        schema = s.message_schema(req, skip=top_bound) if whole else s.field(req.fields_by_name[binding.body])
        if binding.client_streaming and not binding.websocket:
            op["requestBody"] = {
                "required": True,
                "description": "A stream of messages, one JSON object per line; path variables fill the first.",
                "content": {"application/x-ndjson": {"schema": schema}},
            }
        else:
            op["requestBody"] = {"required": binding.body != "*", "content": {"application/json": {"schema": schema}}}

    # Responses.
    resp = binding.response_descriptor
    field = resp.fields_by_name.get(binding.response_body) if binding.response_body else None
    out_schema = s.field(field) if field is not None else s.message_ref(resp)
    error = {"description": "An error (google.rpc.Status).", "content": {"application/json": {"schema": s.status()}}}
    responses: dict[str, Any]
    if binding.websocket:
        responses = {
            "101": {
                "description": "WebSocket: binary frames carry terminal bytes both ways; text frames carry JSON "
                "control messages (resize, signal, exit). The API key goes in a header or a subprotocol."
            }
        }
    elif binding.raw_response_field:
        raw = {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}
        responses = {
            "200": {"description": "The raw bytes, streamed.", "content": {"application/octet-stream": raw}},
            "206": {"description": "The requested Range, streamed.", "content": {"application/octet-stream": raw}},
        }
    elif binding.server_streaming:
        item = {
            "type": "object",
            "description": 'One stream item: {"result": message}; a failure ends the stream with {"error": Status}.',
            "properties": {"result": out_schema, "error": s.status()},
        }
        responses = {
            "200": {
                "description": "A stream: newline-delimited JSON by default, Server-Sent Events (one `data:` line "
                "per item) with `Accept: text/event-stream`.",
                "content": {
                    "application/x-ndjson": {"schema": item},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            }
        }
    else:
        responses = {"200": {"description": "Success.", "content": {"application/json": {"schema": out_schema}}}}
    responses["default"] = error
    op["responses"] = responses
    return op


def build_document(
    table: BindingTable | None = None,
    comments: Mapping[str, str] | None = None,
    *,
    title: str = "Cyberdesk API",
    version: str = "v1",
    servers: Sequence[str] = (),
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every binding in `table` (default: what the REST face serves)."""
    table = table or build_binding_table()
    s = _Schemas(comments or {})
    paths: dict[str, dict[str, Any]] = {}
    for binding in table.bindings:
        if binding.http_method not in OPENAPI_METHODS:
            continue  # a custom verb has no place in an OpenAPI path item
        path = binding.template.openapi_path(_param_names(binding))
        paths.setdefault(path, {})[binding.http_method.lower()] = _operation(binding, s)
    s.status()
    tags = []
    for svc in table.services:
        tag: dict[str, Any] = {"name": svc.name}
        if svc.full_name in s.comments:
            tag["description"] = s.comments[svc.full_name]
        tags.append(tag)
    if any(b.service in OPERATOR_SERVICES for b in table.bindings):
        tags.append({"name": OPERATOR_TAG, "description": OPERATOR_TAG_DESCRIPTION})
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "REST/JSON face of the Cyberdesk gRPC API, generated from the protos and their "
            "google.api.http rules. JSON follows the proto3 JSON mapping: lowerCamelCase names out (either "
            "spelling accepted in), 64-bit integers as strings, bytes as base64, enums by name.",
        },
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": dict(sorted(s.schemas.items())),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "The API key as a bearer token."},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "The API key."},
            },
        },
        "security": [{"bearerAuth": []}, {"apiKeyHeader": []}],
    }
    if servers:
        doc["servers"] = [{"url": u} for u in servers]
    return doc
