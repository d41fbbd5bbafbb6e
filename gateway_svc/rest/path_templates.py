"""Parser and matcher of `google.api.http` path templates (the grammar of google/api/http.proto).

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    FieldPath = IDENT { "." IDENT } ;
    Verb     = ":" LITERAL ;

Matching works on the raw (still percent-encoded) path, split on "/" only, so an encoded "%2F"
never splits a segment. Literals compare after percent-decoding. A variable that covers exactly
one segment decodes everything ("%2F" becomes "/"); a variable covering several segments (or
"**") decodes everything but "%2F"/"%2f", which stay encoded (the spec's reserved expansion).

`TemplateMatcher` maps (HTTP method, raw path) to a payload (in the gateway: an HTTP binding). It
compiles the templates of each HTTP method into a trie: at every segment a literal child is tried
before "*", and "*" before "**", so a literal always wins over a variable, and two templates that
would match exactly the same paths are refused when the table is built.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Characters a literal may hold: RFC 3986 pchar without ":" (which starts the verb), plus "%XX".
_LITERAL = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=@]|%[0-9A-Fa-f]{2})+\Z")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


class TemplateError(ValueError):
    """A path template that does not follow the grammar; raised when the binding table is built."""


class PathDecodeError(ValueError):
    """A request path whose percent-encoding is malformed or whose bytes are not UTF-8."""


@dataclass(frozen=True)
class Segment:
    """One segment of a template: a literal, "*" (one segment) or "**" (zero or more)."""

    kind: str  # "literal" | "*" | "**"
    value: str = ""

    def __str__(self) -> str:
        return self.value if self.kind == "literal" else self.kind


@dataclass(frozen=True)
class Variable:
    """A `{field.path=...}` capture: the template segments [start, end) it covers."""

    field_path: str
    start: int
    end: int
    multi_segment: bool


@dataclass(frozen=True)
class PathTemplate:
    """A compiled template; `str()` gives back a canonical form of the source."""

    source: str
    segments: tuple[Segment, ...]
    variables: tuple[Variable, ...]
    verb: str | None

    def __str__(self) -> str:
        return self.source

    @property
    def field_paths(self) -> tuple[str, ...]:
        """The field paths bound by this template, in order."""
        return tuple(v.field_path for v in self.variables)

    def openapi_path(self, names: dict[str, str] | None = None) -> str:
        """The template as an OpenAPI path: each variable becomes `{name}` (names maps field paths)."""
        names = names or {}
        out: list[str] = []
        i = 0
        by_start = {v.start: v for v in self.variables}
        while i < len(self.segments):
            var = by_start.get(i)
            if var is not None:
                out.append("{" + names.get(var.field_path, var.field_path) + "}")
                i = max(var.end, i + 1)
            else:
                out.append(str(self.segments[i]))
                i += 1
        return "/" + "/".join(out) + (f":{self.verb}" if self.verb is not None else "")


class _Parser:
    def __init__(self, source: str) -> None:
        self.src = source
        self.pos = 0
        self.segments: list[Segment] = []
        self.variables: list[Variable] = []

    def fail(self, why: str) -> TemplateError:
        return TemplateError(f"path template {self.src!r}: {why} at offset {self.pos}")

    def peek(self) -> str:
        return self.src[self.pos] if self.pos < len(self.src) else ""

    def parse(self) -> PathTemplate:
        if not self.src.startswith("/"):
            raise self.fail("a template starts with '/'")
        self.pos = 1
        self.parse_segments(in_variable=False)
        verb: str | None = None
        if self.peek() == ":":
            self.pos += 1
            verb = self.src[self.pos :]
            if not _LITERAL.match(verb):
                raise self.fail(f"verb {verb!r} is not a literal")
            self.pos = len(self.src)
        if self.pos != len(self.src):
            raise self.fail(f"unexpected {self.peek()!r}")
        for i, seg in enumerate(self.segments):
            if seg.kind == "**" and i != len(self.segments) - 1:
                raise TemplateError(f"path template {self.src!r}: '**' must be the last segment")
        paths = [v.field_path for v in self.variables]
        dup = {p for p in paths if paths.count(p) > 1}
        if dup:
            raise TemplateError(f"path template {self.src!r}: field {sorted(dup)[0]!r} bound twice")
        return PathTemplate(self.src, tuple(self.segments), tuple(self.variables), verb)

    def parse_segments(self, in_variable: bool) -> None:
        while True:
            self.parse_segment(in_variable)
            if self.peek() != "/":
                return
            self.pos += 1

    def parse_segment(self, in_variable: bool) -> None:
        c = self.peek()
        if c == "{":
            if in_variable:
                raise self.fail("variables cannot nest")
            self.parse_variable()
            return
        end = self.pos
        while end < len(self.src) and self.src[end] not in "/:{}=":
            end += 1
        text = self.src[self.pos : end]
        if text in ("*", "**"):
            self.segments.append(Segment(text))
        elif text and _LITERAL.match(text) and "*" not in text:
            self.segments.append(Segment("literal", text))
        else:
            raise self.fail(f"bad segment {text!r}" if text else "empty segment")
        self.pos = end

    def parse_variable(self) -> None:
        self.pos += 1  # "{"
        end = self.pos
        while end < len(self.src) and self.src[end] not in "=}":
            end += 1
        field_path = self.src[self.pos : end]
        if not field_path or not all(_IDENT.match(p) for p in field_path.split(".")):
            raise self.fail(f"bad field path {field_path!r}")
        self.pos = end
        start = len(self.segments)
        if self.peek() == "=":
            self.pos += 1
            self.parse_segments(in_variable=True)
        else:
            self.segments.append(Segment("*"))
        if self.peek() != "}":
            raise self.fail("missing '}'")
        self.pos += 1
        covered = self.segments[start:]
        multi = len(covered) > 1 or any(s.kind == "**" for s in covered)
        self.variables.append(Variable(field_path, start, len(self.segments), multi))


def parse(source: str) -> PathTemplate:
    """Compile a template; TemplateError names what is wrong and where."""
    return _Parser(source).parse()


def _unquote(raw: str, keep_slash: bool) -> str:
    """Percent-decode `raw` as UTF-8; with keep_slash, "%2F" and "%2f" stay as they are."""
    data = raw.encode("utf-8")
    if b"%" in data and re.search(rb"%(?![0-9A-Fa-f]{2})", data):
        raise PathDecodeError(f"malformed percent-encoding in {raw!r}")

    def repl(m: re.Match[bytes]) -> bytes:
        byte = int(m.group(1), 16)
        if keep_slash and byte == 0x2F:
            return m.group(0)
        return bytes([byte])

    try:
        return _PERCENT.sub(repl, data).decode("utf-8")
    except UnicodeDecodeError:
        raise PathDecodeError(f"path segment {raw!r} does not decode to UTF-8") from None


@dataclass
class _Node(Generic[T]):
    literals: dict[str, _Node[T]] = field(default_factory=dict)
    star: _Node[T] | None = None
    deep: _Node[T] | None = None  # "**": always the last node before the verb
    ends: dict[str | None, tuple[PathTemplate, T]] = field(default_factory=dict)


@dataclass(frozen=True)
class TemplateMatch(Generic[T]):
    """A successful match: the payload, its template and the decoded variable values by field path."""

    payload: T
    template: PathTemplate
    variables: dict[str, str]


class TemplateMatcher(Generic[T]):
    """Matches (HTTP method, raw path) to a payload; literal segments win over variables."""

    def __init__(self) -> None:
        self._roots: dict[str, _Node[T]] = {}

    def add(self, method: str, template: PathTemplate | str, payload: T) -> None:
        """Add a template and its payload; TemplateError when an equal template is already there for `method`."""
        tpl = parse(template) if isinstance(template, str) else template
        node = self._roots.setdefault(method.upper(), _Node())
        for seg in tpl.segments:
            if seg.kind == "literal":
                node = node.literals.setdefault(_unquote(seg.value, keep_slash=False), _Node())
            elif seg.kind == "*":
                node.star = node.star or _Node()
                node = node.star
            else:
                node.deep = node.deep or _Node()
                node = node.deep
        if tpl.verb in node.ends:
            other = node.ends[tpl.verb][0]
            raise TemplateError(f"{method.upper()} {tpl.source!r} matches the same paths as {other.source!r}")
        node.ends[tpl.verb] = (tpl, payload)

    def methods(self) -> list[str]:
        """The HTTP methods that have at least one template."""
        return sorted(self._roots)

    def match(self, method: str, path: str) -> TemplateMatch[T] | None:
        """The payload for `method` and the raw (percent-encoded, query-less) `path`, or None.

        PathDecodeError when a captured variable has malformed percent-encoding.
        """
        root = self._roots.get(method.upper())
        if root is None or not path.startswith("/"):
            return None
        raw = path[1:].split("/")
        # A ":verb" is split off the last segment only where it is written raw ("%3A" is data).
        candidates: list[tuple[list[str], str | None]] = []
        last = raw[-1]
        if ":" in last:
            head, _, verb_text = last.rpartition(":")
            candidates.append(([*raw[:-1], head], verb_text))
        candidates.append((raw, None))
        for segs, verb in candidates:
            decoded = [_safe_unquote(s) for s in segs]
            found = self._walk(root, segs, decoded, 0, verb)
            if found is not None:
                tpl, payload = found
                return TemplateMatch(payload, tpl, _captures(tpl, segs))
        return None

    def _walk(
        self, node: _Node[T], raw: list[str], decoded: list[str | None], i: int, verb: str | None
    ) -> tuple[PathTemplate, T] | None:
        if i == len(raw):
            hit = node.ends.get(verb)
            if hit is not None:
                return hit
            # "**" also matches zero segments.
            return node.deep.ends.get(verb) if node.deep is not None else None
        text = decoded[i]
        if text is not None:
            child = node.literals.get(text)
            if child is not None:
                found = self._walk(child, raw, decoded, i + 1, verb)
                if found is not None:
                    return found
        # "*" stands for one non-empty segment; an empty one ("a//b", a trailing "/") is no id.
        if node.star is not None and raw[i]:
            found = self._walk(node.star, raw, decoded, i + 1, verb)
            if found is not None:
                return found
        if node.deep is not None:
            return node.deep.ends.get(verb)
        return None


def _safe_unquote(raw: str) -> str | None:
    try:
        return _unquote(raw, keep_slash=False)
    except PathDecodeError:
        return None  # cannot equal a literal; a variable capturing it reports the error


def _captures(tpl: PathTemplate, raw: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    deep_at = next((i for i, s in enumerate(tpl.segments) if s.kind == "**"), None)
    for var in tpl.variables:
        end = len(raw) if deep_at is not None and var.end > deep_at else var.end
        part = raw[var.start : end]
        out[var.field_path] = (
            _unquote("/".join(part), keep_slash=True) if var.multi_segment else _unquote(part[0], keep_slash=False)
        )
    return out


def parse_all(sources: Iterable[str]) -> list[PathTemplate]:
    """Compile several templates (handy for tests and start-up checks)."""
    return [parse(s) for s in sources]
