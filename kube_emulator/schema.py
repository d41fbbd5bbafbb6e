"""What the API server does with a custom resource's structural schema: prune unknown fields, validate.

CEL rules (x-kubernetes-validations) are not evaluated here; the OpenAPI part (types, required,
enums, patterns, bounds, formats) is, with jsonschema, and unknown fields are dropped as the API
server drops them, so a writer that misspells a status field sees it vanish here as it would there.
"""

from __future__ import annotations

import datetime
from typing import Any

import jsonschema

_FORMATS = jsonschema.FormatChecker([])


def _date_time(value: object) -> bool:
    """RFC 3339 with a time zone, as the API server's date-time format wants."""
    if not isinstance(value, str):
        return True
    parsed = datetime.datetime.fromisoformat(value)
    return parsed.tzinfo is not None and "T" in value.upper()


_FORMATS.checks("date-time", raises=ValueError)(_date_time)


def prune(obj: Any, schema: dict[str, Any]) -> Any:
    """`obj` without the fields `schema` does not declare (x-kubernetes-preserve-unknown-fields keeps them)."""
    if isinstance(obj, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            props = schema.get("properties", {})
            return {k: prune(v, props[k]) if k in props else v for k, v in obj.items()}
        if "properties" in schema:
            props = schema["properties"]
            return {k: prune(v, props[k]) for k, v in obj.items() if k in props}
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return {k: prune(v, extra) for k, v in obj.items()}
        if schema.get("type") == "object" and not extra:
            # `type: object` with no properties (e.g. metadata): the API server handles it itself.
            return obj
        return obj
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [prune(v, schema["items"]) for v in obj]
    return obj


def _path(error: jsonschema.ValidationError) -> str:
    out = ""
    for step in error.absolute_path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out or "<root>"


def validate(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """The API server's field errors for `obj` (empty when valid), e.g. "spec.resources.vcpu: ..."."""
    body = {k: v for k, v in obj.items() if k != "metadata"}
    check = {**schema, "properties": {k: v for k, v in schema.get("properties", {}).items() if k != "metadata"}}
    validator = jsonschema.Draft7Validator(check, format_checker=_FORMATS)
    return sorted(f"{_path(e)}: Invalid value: {e.message}" for e in validator.iter_errors(body))
