"""HTTP request -> protobuf request, and protobuf response -> JSON: the proto3 JSON mapping both ways.

A request message is filled in this order, as google/api/http.proto says:

1. the body: with `body: "*"` the whole message from a JSON object; with `body: "<field>"` that one
   field from any JSON value; with no body, an empty (or absent) HTTP body;
2. the path variables (percent-decoded by the matcher), each converted to its field's type;
3. every field bound by neither, from query parameters (not allowed with `body: "*"`): nested
   fields as `a.b`, repeated fields by repetition (`?s=A&s=B`), maps as `labels[key]=value`, enums
   by name or number, Timestamp (RFC 3339), Duration ("1.5s"), FieldMask ("a,b"), wrappers and bytes
   (base64, standard or URL-safe).

JSON field names are accepted in either form (`page_size` or `pageSize`); output uses lowerCamelCase
and prints fields without presence even at their default, so `"exitCode": 0` is visible. Anything
wrong (bad JSON, an unknown field, a value of the wrong type, a field set twice) is an
INVALID_ARGUMENT RpcError whose message names the offending field.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from cyberdesk_common.status import RpcError, invalid_argument
from gateway_svc.rest.http_bindings import HttpBinding, resolve_field_path

_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)
_WRAPPERS = {
    f"google.protobuf.{n}Value"
    for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
}
# Well-known message types that a single query parameter or path variable can carry.
QUERY_MESSAGE_TYPES = _WRAPPERS | {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
_QUERY_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)(?:\[([^\]]*)\])?\Z")


def is_repeated(f: FieldDescriptor) -> bool:
    """Whether a field is repeated (maps included)."""
    return bool(f.is_repeated)


def is_map(f: FieldDescriptor) -> bool:
    """Whether a field is a map."""
    return f.message_type is not None and bool(f.message_type.GetOptions().map_entry)


def find_field(desc: Descriptor, name: str) -> FieldDescriptor | None:
    """A field by its proto name or its JSON (lowerCamelCase) name."""
    f = desc.fields_by_name.get(name)
    if f is not None:
        return f
    for cand in desc.fields:
        if cand.json_name == name:
            return cand
    return None


# ---------------------------------------------------------------------------------------------
# Scalars from text (path variables and query parameters)


def _bad(where: str, text: str, expected: str) -> RpcError:
    shown = text if len(text) <= 64 else text[:61] + "..."
    return invalid_argument(f"{where}: {shown!r} is not {expected}")


def scalar_from_text(f: FieldDescriptor, text: str, where: str) -> Any:
    """The value of scalar or enum field `f` written as `text`; `where` names it in errors."""
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return text
    if t == FieldDescriptor.TYPE_BYTES:
        return _base64(text, where)
    if t in _INT_RANGES:
        if not re.fullmatch(r"[-+]?[0-9]+", text):
            return _raise(_bad(where, text, "an integer"))
        lo, hi = _INT_RANGES[t]
        value = int(text)
        if not lo <= value <= hi:
            raise invalid_argument(f"{where}: {text} is out of range [{lo}, {hi}]")
        return value
    if t in _FLOATS:
        special = {"nan": "nan", "infinity": "inf", "-infinity": "-inf"}
        if text.lower() in special:
            return float(special[text.lower()])
        if not re.fullmatch(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?", text):
            return _raise(_bad(where, text, "a number"))
        return float(text)
    if t == FieldDescriptor.TYPE_BOOL:
        low = text.lower()
        if low in ("true", "1"):
            return True
        if low in ("false", "0"):
            return False
        return _raise(_bad(where, text, "a boolean (true or false)"))
    if t == FieldDescriptor.TYPE_ENUM and f.enum_type is not None:
        enum = f.enum_type
        by_name = enum.values_by_name.get(text)
        if by_name is not None:
            return by_name.number
        if re.fullmatch(r"-?[0-9]+", text) and int(text) in enum.values_by_number:
            return int(text)
        names = ", ".join(v.name for v in enum.values)
        raise invalid_argument(f"{where}: {text!r} is not a value of {enum.full_name} ({names}, or their numbers)")
    raise invalid_argument(f"{where}: a {f.full_name} cannot be written as text")


def _raise(err: RpcError) -> Any:
    raise err


def _base64(text: str, where: str) -> bytes:
    # Both alphabets, with or without padding: query strings often carry the URL-safe one unpadded.
    s = text.strip().replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(where, text, "base64") from None


def message_from_text(msg: Message, text: str, where: str) -> None:
    """Fill a well-known message (Timestamp, Duration, FieldMask, a wrapper) from its text form."""
    name = msg.DESCRIPTOR.full_name
    try:
        if name == "google.protobuf.FieldMask":
            paths = [p.strip() for p in text.split(",") if p.strip()]
            # Either spelling: camelCase (the JSON form) or the proto field names.
            fm: Any = msg
            fm.Clear()
            for p in paths:
                fm.paths.append(p if "_" in p else re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), p))
            return
        if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
            any_msg: Any = msg
            any_msg.FromJsonString(text)
            return
    except ValueError as exc:
        kind = "an RFC 3339 time like 2024-05-01T12:00:00Z" if name.endswith("Timestamp") else 'a duration like "1.5s"'
        raise invalid_argument(f"{where}: {text!r} is not {kind} ({exc})") from None
    if name in _WRAPPERS:
        inner: Any = msg.DESCRIPTOR.fields_by_name["value"]
        wrapper: Any = msg
        wrapper.value = scalar_from_text(inner, text, where)
        return
    raise invalid_argument(f"{where}: a {name} cannot be set from text; send it in a JSON body")


# ---------------------------------------------------------------------------------------------
# Setting fields by path


def _set_text(
    msg: Message, chain: Sequence[FieldDescriptor], values: Sequence[str], where: str, map_key: str | None = None
) -> None:
    """Set the field at the end of `chain` below `msg` from one or more text values."""
    target = msg
    for f in chain[:-1]:
        _check_oneof(target, f, where)
        target = getattr(target, f.name)
    leaf = chain[-1]
    _check_oneof(target, leaf, where)
    if is_map(leaf):
        if map_key is None:
            raise invalid_argument(f"{where}: a map; write it as {where}[key]=value")
        entry: Any = leaf.message_type
        kf, vf = entry.fields_by_name["key"], entry.fields_by_name["value"]
        if vf.message_type is not None:
            raise invalid_argument(f"{where}: a map of messages cannot be set from query parameters")
        if len(values) > 1:
            raise invalid_argument(f"{where}[{map_key}]: given more than once")
        key = scalar_from_text(kf, map_key, f"{where} key")
        getattr(target, leaf.name)[key] = scalar_from_text(vf, values[0], f"{where}[{map_key}]")
        return
    if map_key is not None:
        raise invalid_argument(f"{where}: not a map; [key] is only for map fields")
    if is_repeated(leaf):
        container = getattr(target, leaf.name)
        for v in values:
            if leaf.message_type is not None:
                if leaf.message_type.full_name not in QUERY_MESSAGE_TYPES:
                    raise invalid_argument(f"{where}: a repeated {leaf.message_type.full_name} cannot be set as text")
                message_from_text(container.add(), v, where)
            else:
                container.append(scalar_from_text(leaf, v, where))
        return
    if len(values) > 1:
        raise invalid_argument(f"{where}: given {len(values)} times but it is not repeated")
    if leaf.message_type is not None:
        if leaf.message_type.full_name not in QUERY_MESSAGE_TYPES:
            fields = ", ".join(f"{where}.{c.name}" for c in leaf.message_type.fields)
            raise invalid_argument(f"{where}: a message; set its fields ({fields})")
        message_from_text(getattr(target, leaf.name), values[0], where)
        return
    setattr(target, leaf.name, scalar_from_text(leaf, values[0], where))


def _check_oneof(parent: Message, f: FieldDescriptor, where: str) -> None:
    oneof = f.containing_oneof
    if oneof is None:
        return
    current = parent.WhichOneof(oneof.name)
    if current is not None and current != f.name:
        raise invalid_argument(
            f"{where}: {f.name} and {current} are alternatives (oneof {oneof.name}); give only one of them"
        )


def _leaf_value(msg: Message, chain: Sequence[FieldDescriptor]) -> Any:
    target = msg
    for f in chain[:-1]:
        target = getattr(target, f.name)
    return getattr(target, chain[-1].name)


# ---------------------------------------------------------------------------------------------
# JSON


def _load_json(body: bytes, where: str) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_argument(f"{where} is not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"line {exc.lineno} column {exc.colno}"
        raise invalid_argument(f"{where} is not valid JSON: {exc.msg} at {at}") from None
    except RecursionError:
        raise invalid_argument(f"{where} is nested too deeply") from None


_NO_FIELD = re.compile(r'Message type "([^"]+)" has no field named "([^"]+)" at "([^"]*)"')


def _clean_parse_error(exc: Exception, where: str) -> RpcError:
    text = str(exc).split("\n")[0].strip()
    m = _NO_FIELD.search(text)
    if m:
        _, field_name, at = m.groups()
        path = at.split(".", 1)[1] + "." if "." in at else ""
        return invalid_argument(f"{where}: unknown field {path}{field_name!s}")
    return invalid_argument(f"{where}: {text.rstrip('.')}")


def parse_json_into(value: Any, msg: Message, where: str) -> None:
    """Merge the JSON value `value` into `msg` (proto3 JSON mapping; unknown fields rejected)."""
    try:
        json_format.ParseDict(value, msg, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise _clean_parse_error(exc, where) from None


def message_from_json(cls: type[Message], body: bytes, where: str = "request body") -> Message:
    """One message from a JSON object (a body, or one line of an NDJSON request stream)."""
    value = _load_json(body, where) if body.strip() else {}
    if not isinstance(value, dict):
        raise invalid_argument(f"{where} must be a JSON object, not {type(value).__name__}")
    msg = cls()
    parse_json_into(value, msg, where)
    return msg


# ---------------------------------------------------------------------------------------------
# The request


def parse_query(query: str | bytes) -> list[tuple[str, str]]:
    """Decode a raw query string ("a=1&b=x%20y") into pairs, keeping blank values; 400 on bad UTF-8."""
    raw = query.decode("latin-1") if isinstance(query, bytes) else query
    try:
        return parse_qsl(raw, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise invalid_argument("query string is not UTF-8 after percent-decoding") from None


def _resolve_query_key(desc: Descriptor, key: str) -> tuple[list[FieldDescriptor], str | None]:
    m = _QUERY_KEY.match(key)
    if m is None:
        raise invalid_argument(f"query parameter {key!r}: not a field path (a, a.b or map[key])")
    chain: list[FieldDescriptor] = []
    current = desc
    parts = m.group(1).split(".")
    for i, part in enumerate(parts):
        f = find_field(current, part)
        if f is None:
            so_far = ".".join(parts[:i])
            known = ", ".join(c.name for c in current.fields)
            inside = f" in {so_far}" if so_far else ""
            raise invalid_argument(f"query parameter {key!r}: unknown field {part!r}{inside} (fields: {known})")
        chain.append(f)
        if i < len(parts) - 1:
            if f.message_type is None or is_repeated(f) or f.message_type.full_name in QUERY_MESSAGE_TYPES:
                raise invalid_argument(f"query parameter {key!r}: {part} has no sub-fields")
            current = f.message_type
    return chain, m.group(2)


def decode_request(
    binding: HttpBinding,
    variables: Mapping[str, str],
    query: str | bytes | Iterable[tuple[str, str]] = "",
    body: bytes | None = None,
) -> Message:
    """The request message of `binding` from path variables, query parameters and a JSON body.

    For a binding with a raw body (`binding.raw_request_field`, the file upload) pass body=None: the
    returned message is the first of the stream and the HTTP layer sends the bytes with
    `chunk_message`.
    """
    msg = binding.new_request()
    req = binding.request_descriptor
    body_bytes = body or b""

    # 1. Body.
    if binding.body == "*":
        msg = message_from_json(binding.request_class(), body_bytes)
    elif binding.body and not binding.raw_request_field:
        if body_bytes.strip():
            f = req.fields_by_name[binding.body]
            value = _load_json(body_bytes, "request body")
            parse_json_into({f.json_name: value}, msg, "request body")
    elif not binding.body and body_bytes.strip():
        raise invalid_argument(f"{binding.http_method} {binding.template} takes no request body")

    # 2. Path variables.
    for path, raw in variables.items():
        chain = resolve_field_path(req, path)
        value = raw
        if path in binding.absolute_path_fields and not value.startswith("/"):
            value = "/" + value
        where = f"path variable {path}"
        if binding.body == "*":
            before = _leaf_value(msg, chain)
            probe = binding.new_request()
            _set_text(probe, chain, [value], where)
            wanted = _leaf_value(probe, chain)
            if before not in ("", 0, False, b"") and before != wanted:
                raise invalid_argument(f"{path}: the path says {wanted!r} but the body says {before!r}")
        _set_text(msg, chain, [value], where)

    # 3. Query parameters.
    pairs = parse_query(query) if isinstance(query, str | bytes) else list(query)
    if not pairs:
        return msg
    if binding.body == "*":
        raise invalid_argument(
            f"query parameter {pairs[0][0]!r}: {binding.http_method} {binding.template}"
            " takes the whole request in the body"
        )
    grouped: dict[tuple[str, str | None], tuple[list[FieldDescriptor], list[str]]] = {}
    for key, value in pairs:
        chain, map_key = _resolve_query_key(req, key)
        proto_path = ".".join(f.name for f in chain)
        for bound in variables:
            if proto_path == bound or bound.startswith(proto_path + ".") or proto_path.startswith(bound + "."):
                raise invalid_argument(f"query parameter {key!r}: {bound} is already given in the path")
        if binding.body and (proto_path == binding.body or proto_path.startswith(binding.body + ".")):
            raise invalid_argument(f"query parameter {key!r}: {binding.body} is carried by the request body")
        slot = grouped.setdefault((proto_path, map_key), (chain, []))
        slot[1].append(value)
    for (proto_path, map_key), (chain, values) in grouped.items():
        _set_text(msg, chain, values, f"query parameter {proto_path}", map_key)
    return msg


def chunk_message(binding: HttpBinding, data: bytes) -> Message:
    """A follow-up message of a raw-body upload stream carrying `data` in the raw body field."""
    msg = binding.new_request()
    setattr(msg, binding.raw_request_field, data)
    return msg


# ---------------------------------------------------------------------------------------------
# The response


def message_to_json_value(msg: Message) -> Any:
    """The proto3 JSON form of a message: lowerCamelCase names, fields without presence printed."""
    return json_format.MessageToDict(msg, always_print_fields_with_no_presence=True)


def encode_response(binding: HttpBinding, msg: Message) -> Any:
    """The JSON value of a response (or of one message of a stream), honouring `response_body`."""
    if not binding.response_body:
        return message_to_json_value(msg)
    f: Any = msg.DESCRIPTOR.fields_by_name[binding.response_body]
    if f.message_type is not None and not is_repeated(f):
        return message_to_json_value(getattr(msg, f.name))
    return message_to_json_value(msg).get(f.json_name)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def ndjson_line(value: Any) -> bytes:
    """One line of a newline-delimited JSON stream."""
    return dumps(value) + b"\n"


def sse_event(value: Any, event: str | None = None) -> bytes:
    """One Server-Sent Event carrying a JSON value (no newline can occur inside compact JSON)."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + dumps(value) + b"\n\n"


def stream_result(binding: HttpBinding, msg: Message) -> dict[str, Any]:
    """A stream item: `{"result": <message>}`; a failure ends the stream with `{"error": <Status>}`."""
    return {"result": encode_response(binding, msg)}
