"""The path-template grammar, percent-decoding rules and match precedence of google/api/http.proto."""

from __future__ import annotations

import pytest

from gateway_svc.rest.path_templates import PathDecodeError, TemplateError, TemplateMatcher, parse

# (template, path, expected variables or None for no match)
MATCHES: list[tuple[str, str, dict[str, str] | None]] = [
    ("/v1/things", "/v1/things", {}),
    ("/v1/things", "/v1/thing", None),
    ("/v1/things", "/v1/things/x", None),
    ("/v1/things/{id}", "/v1/things/abc", {"id": "abc"}),
    ("/v1/things/{id}", "/v1/things/", None),  # "*" needs a non-empty segment
    ("/v1/things/{id}", "/v1/things/a/b", None),
    ("/v1/things/{id=*}", "/v1/things/abc", {"id": "abc"}),
    ("/v1/things/*", "/v1/things/abc", {}),
    ("/v1/*/x", "/v1/anything/x", {}),
    ("/v1/**", "/v1", {}),
    ("/v1/**", "/v1/a/b/c", {}),
    ("/v1/{name=things/*}", "/v1/things/t1", {"name": "things/t1"}),
    ("/v1/{name=things/*}", "/v1/other/t1", None),
    ("/v1/{name=things/*/parts/*}", "/v1/things/t1/parts/p2", {"name": "things/t1/parts/p2"}),
    ("/v1/{name=**}", "/v1/a/b/c", {"name": "a/b/c"}),
    ("/v1/{name=**}", "/v1", {"name": ""}),
    ("/v1/{a.b.c}", "/v1/deep", {"a.b.c": "deep"}),
    ("/v1/{x}/y/{z}", "/v1/1/y/2", {"x": "1", "z": "2"}),
    ("/v1/things/{id}:cancel", "/v1/things/abc:cancel", {"id": "abc"}),
    ("/v1/things/{id}:cancel", "/v1/things/abc:other", None),
    ("/v1/things/{id}:cancel", "/v1/things/abc", None),
    ("/v1/things:batch", "/v1/things:batch", {}),
    ("/v1/{name=**}:verb", "/v1/a/b:verb", {"name": "a/b"}),
    # An encoded ":" is data, not a verb separator.
    ("/v1/things/{id}", "/v1/things/a%3Acancel", {"id": "a:cancel"}),
    # A raw ":" that is no known verb stays part of the value.
    ("/v1/things/{id}", "/v1/things/a:b", {"id": "a:b"}),
    # Single-segment variables decode everything, "%2F" included.
    ("/v1/things/{id}", "/v1/things/a%2Fb%20c%25", {"id": "a/b c%"}),
    ("/v1/things/{id}", "/v1/things/%E2%82%AC", {"id": "\u20ac"}),
    # Multi-segment variables decode everything but "%2F"/"%2f" (reserved expansion).
    ("/v1/{name=**}", "/v1/a%2Fb/c%20d", {"name": "a%2Fb/c d"}),
    ("/v1/{name=**}", "/v1/a%2fb", {"name": "a%2fb"}),
    ("/v1/{name=things/*}", "/v1/things/x%2Fy", {"name": "things/x%2Fy"}),
    # "%2F" never splits a segment, so it cannot fake an extra path level.
    ("/v1/things/{id}/parts", "/v1/things/a%2Fparts", None),
    # Literals match after decoding.
    ("/v1/things", "/v1/%74hings", {}),
]


@pytest.mark.parametrize(("template", "path", "expected"), MATCHES)
def test_match_table(template: str, path: str, expected: dict[str, str] | None) -> None:
    router: TemplateMatcher[str] = TemplateMatcher()
    router.add("GET", template, "r")
    found = router.match("GET", path)
    if expected is None:
        assert found is None
    else:
        assert found is not None
        assert found.variables == expected


BAD_TEMPLATES = [
    ("", "starts with '/'"),
    ("v1/things", "starts with '/'"),
    ("/v1//things", "empty segment"),
    ("/v1/things/", "empty segment"),
    ("/v1/{id", "missing '}'"),
    ("/v1/{}", "bad field path"),
    ("/v1/{a..b}", "bad field path"),
    ("/v1/{1a}", "bad field path"),
    ("/v1/{a={b}}", "cannot nest"),
    ("/v1/**/x", "'**' must be the last"),
    ("/v1/{a=**}/x", "'**' must be the last"),
    ("/v1/{a}/{a}", "bound twice"),
    ("/v1/x:", "verb"),
    ("/v1/x:a/b", "verb"),
    ("/v1/a*b", "bad segment"),
    ("/v1/a b", "bad segment"),
    ("/v1/x}", "unexpected"),
]


@pytest.mark.parametrize(("template", "why"), BAD_TEMPLATES)
def test_bad_templates_are_refused_with_the_reason(template: str, why: str) -> None:
    with pytest.raises(TemplateError, match=why.replace("*", r"\*")):
        parse(template)


def test_parse_structure() -> None:
    tpl = parse("/v1/{name=projects/*/things/**}:get")
    assert [str(s) for s in tpl.segments] == ["v1", "projects", "*", "things", "**"]
    assert tpl.verb == "get"
    (var,) = tpl.variables
    assert (var.field_path, var.start, var.end, var.multi_segment) == ("name", 1, 5, True)
    assert parse("/v1/{id}").variables[0].multi_segment is False
    assert parse("/v1/{id}").openapi_path() == "/v1/{id}"
    assert tpl.openapi_path({"name": "n"}) == "/v1/{n}:get"


def test_literal_wins_over_variable_and_star_over_double_star() -> None:
    router: TemplateMatcher[str] = TemplateMatcher()
    router.add("GET", "/v1/things/{id}", "var")
    router.add("GET", "/v1/things/special", "literal")
    router.add("GET", "/v1/{rest=**}", "deep")
    assert router.match("GET", "/v1/things/special") is not None
    assert router.match("GET", "/v1/things/special").payload == "literal"  # type: ignore[union-attr]
    assert router.match("GET", "/v1/things/other").payload == "var"  # type: ignore[union-attr]
    assert router.match("GET", "/v1/things/a/b").payload == "deep"  # type: ignore[union-attr]


def test_backtracks_out_of_a_literal_branch() -> None:
    router: TemplateMatcher[str] = TemplateMatcher()
    router.add("GET", "/v1/things/special/parts", "literal")
    router.add("GET", "/v1/things/{id}/items", "var")
    found = router.match("GET", "/v1/things/special/items")
    assert found is not None and found.payload == "var" and found.variables == {"id": "special"}


def test_verb_route_preferred_over_plain_variable() -> None:
    router: TemplateMatcher[str] = TemplateMatcher()
    router.add("POST", "/v1/things/{id}", "plain")
    router.add("POST", "/v1/things/{id}:run", "verb")
    assert router.match("POST", "/v1/things/a:run").payload == "verb"  # type: ignore[union-attr]
    assert router.match("POST", "/v1/things/a:walk").variables == {"id": "a:walk"}  # type: ignore[union-attr]


def test_methods_are_separate() -> None:
    router: TemplateMatcher[str] = TemplateMatcher()
    router.add("GET", "/v1/things/{id}", "get")
    router.add("delete", "/v1/things/{id}", "delete")
    assert router.match("DELETE", "/v1/things/1").payload == "delete"  # type: ignore[union-attr]
    assert router.match("POST", "/v1/things/1") is None
    assert router.methods() == ["DELETE", "GET"]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("/v1/things/{id}", "/v1/things/{name}"),
        ("/v1/things/{id}", "/v1/things/*"),
        ("/v1/{a=**}", "/v1/**"),
        ("/v1/things", "/v1/%74hings"),
    ],
)
def test_ambiguous_templates_are_refused(first: str, second: str) -> None:
    router: TemplateMatcher[str] = TemplateMatcher()
    router.add("GET", first, "a")
    with pytest.raises(TemplateError, match="matches the same paths"):
        router.add("GET", second, "b")


@pytest.mark.parametrize("path", ["/v1/things/%zz", "/v1/things/%E2%82", "/v1/things/%"])
def test_malformed_percent_encoding_in_a_variable(path: str) -> None:
    router: TemplateMatcher[str] = TemplateMatcher()
    router.add("GET", "/v1/things/{id}", "r")
    with pytest.raises(PathDecodeError):
        router.match("GET", path)


def test_paths_without_leading_slash_do_not_match() -> None:
    router: TemplateMatcher[str] = TemplateMatcher()
    router.add("GET", "/v1/things", "r")
    assert router.match("GET", "v1/things") is None
    assert router.match("GET", "") is None
