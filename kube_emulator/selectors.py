"""Label and field selectors as the Kubernetes API server parses and applies them."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Matcher = Callable[[Mapping[str, Any]], bool]

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_SET_RE = re.compile(rf"^\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s+\((?P<values>[^)]*)\)\s*$")
_EQ_RE = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>==|!=|=)\s*(?P<value>[-A-Za-z0-9_.]*)\s*$")
_EXISTS_RE = re.compile(rf"^\s*(?P<neg>!?)\s*(?P<key>{_KEY})\s*$")


class SelectorError(ValueError):
    """The selector does not parse; the API server answers 400 BadRequest."""


def _split(selector: str) -> list[str]:
    """Split on the commas that are not inside a set's parentheses."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def _term(part: str) -> Matcher:
    if m := _SET_RE.match(part):
        key, negate = m["key"], m["op"] == "notin"
        values = {v.strip() for v in m["values"].split(",") if v.strip()}

        def in_set(labels: Mapping[str, Any]) -> bool:
            return (labels.get(key) in values) != negate

        return in_set
    if m := _EQ_RE.match(part):
        key, value, negate = m["key"], m["value"], m["op"] == "!="

        def equal(labels: Mapping[str, Any]) -> bool:
            return (key in labels and labels[key] == value) != negate

        return equal
    if m := _EXISTS_RE.match(part):
        key, negate = m["key"], bool(m["neg"])

        def exists(labels: Mapping[str, Any]) -> bool:
            return (key in labels) != negate

        return exists
    raise SelectorError(f"unable to parse requirement: {part.strip()!r}")


def label_selector(selector: str | None) -> Matcher:
    """A predicate over an object's labels for `selector` ("" or None matches everything)."""
    terms = [_term(part) for part in _split(selector or "")]
    return lambda labels: all(term(labels) for term in terms)


def _field_term(part: str) -> Matcher:
    m = re.match(r"^\s*(?P<path>[A-Za-z0-9_.]+)\s*(?P<op>==|!=|=)\s*(?P<value>[^,]*)\s*$", part)
    if not m:
        raise SelectorError(f"invalid field selector: {part.strip()!r}")
    path, value, negate = m["path"].split("."), m["value"], m["op"] == "!="

    def match(obj: Mapping[str, Any]) -> bool:
        cur: Any = obj
        for step in path:
            cur = cur.get(step) if isinstance(cur, Mapping) else None
        return (("" if cur is None else str(cur)) == value) != negate

    return match


def field_selector(selector: str | None) -> Matcher:
    """A predicate over a whole object for `selector` (equality on dotted paths, e.g. metadata.name)."""
    terms = [_field_term(part) for part in _split(selector or "")]
    return lambda obj: all(term(obj) for term in terms)
