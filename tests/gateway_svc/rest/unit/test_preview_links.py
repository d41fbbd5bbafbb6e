"""The pure half of previews: tokens, host and path matching, header rewriting, minted URLs (no sockets)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc
import pytest

from cyberdesk_common.status import RpcError
from gateway_svc.rest.preview_links import (
    PreviewGrant,
    PreviewTokens,
    cookie_token,
    match,
    match_host,
    preview_urls,
    split_token_query,
    upstream_headers,
)

GRANT = PreviewGrant("tenant-a", "i-abc", 3000, expires=2_000_000_000, public=False)


def _unauthenticated(tokens: PreviewTokens, token: str, now: float = 1_900_000_000) -> str:
    with pytest.raises(RpcError) as err:
        tokens.verify(token, now)
    assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
    return err.value.message


def test_token_round_trip_and_expiry() -> None:
    tokens = PreviewTokens(b"s" * 32)
    token = tokens.mint(GRANT)
    assert tokens.verify(token, 1_900_000_000) == GRANT
    assert "expired" in _unauthenticated(tokens, token, now=2_000_000_000)


def test_tampered_or_foreign_tokens_are_refused() -> None:
    tokens = PreviewTokens(b"s" * 32)
    token = tokens.mint(GRANT)
    payload, mac = token.split(".")
    other = PreviewTokens(b"t" * 32).mint(PreviewGrant("tenant-b", "i-abc", 3000, 2_000_000_000, True))
    # Another tenant's payload under this MAC, the MAC of another secret, garbage: all "not valid".
    for bad in (other.split(".")[0] + "." + mac, payload + "." + other.split(".")[1], "x", "", "a.b", payload + "."):
        assert _unauthenticated(tokens, bad) == "the preview token is not valid"


def test_secret_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    first = PreviewTokens.from_state_dir(tmp_path)
    path = tmp_path / "gateway_preview_secret"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = PreviewTokens.from_state_dir(tmp_path)
    assert again.verify(first.mint(GRANT), 0) == GRANT
    shared = PreviewTokens.from_state_dir(tmp_path / "elsewhere", override="x" * 32)
    assert PreviewTokens.from_state_dir(tmp_path / "other", override="x" * 32).verify(shared.mint(GRANT), 0) == GRANT


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("3000-i-abc.localhost:8080", ("i-abc", 3000)),
        ("3000-I-ABC.LocalHost", ("i-abc", 3000)),
        ("8888-i-7f3a9c2e1b4d.preview.example.com.", ("i-7f3a9c2e1b4d", 8888)),
        ("localhost:8080", None),
        ("i-abc.localhost", None),
        ("70000-i-abc.localhost", None),
        ("3000-i-abc.evil.com", None),
        ("x.3000-i-abc.localhost", None),
        ("127.0.0.1:8080", None),
    ],
)
def test_match_host(host: str, expected: tuple[str, int] | None) -> None:
    domain = "preview.example.com" if "example" in host else "localhost"
    assert match_host(host, domain) == expected


def test_match_path_and_host_forms() -> None:
    by_path = match("127.0.0.1:8080", "/v1/instances/i-abc/ports/3000/a/b%20c", "", "localhost")
    assert by_path is not None
    assert (by_path.instance_id, by_path.port, by_path.target) == ("i-abc", 3000, "/a/b%20c")
    assert by_path.path_prefix == "/v1/instances/i-abc/ports/3000"
    bare = match("", "/v1/instances/i-abc/ports/3000", "", "localhost")
    assert bare is not None and bare.target == "/"
    by_host = match("3000-i-abc.localhost", "/v1/instances/i-x/ports/1/", "q=1", "localhost")
    assert by_host is not None and by_host.target == "/v1/instances/i-x/ports/1/?q=1" and by_host.path_prefix == ""
    # The API's own routes, including the one that mints links, are not previews.
    for path in ("/v1/instances/i-abc", "/v1/instances/i-abc/previewUrls", "/v1/instances/i-abc/ports/x/"):
        assert match("127.0.0.1:8080", path, "", "localhost") is None
    assert match("127.0.0.1", "/v1/instances/i-abc/ports/0/", "", "localhost") is None


def test_token_query_and_cookie_are_taken_out() -> None:
    assert split_token_query("a=1&cyberdesk_preview_token=t%2Bk&b=%2F") == ("t+k", "a=1&b=%2F")
    assert split_token_query("a=1") == ("", "a=1")
    assert cookie_token("x=1; cyberdesk_preview_token=tok; y=2") == ("tok", "x=1; y=2")
    assert cookie_token("x=1") == ("", "x=1")


def test_upstream_headers() -> None:
    incoming = [
        (b"host", b"3000-i-abc.localhost:8080"),
        (b"x-api-key", b"cd_secret"),
        (b"connection", b"keep-alive"),
        (b"x-forwarded-for", b"1.2.3.4"),  # a client cannot pose as the proxy
        (b"cookie", b"x=1; cyberdesk_preview_token=t"),
        (b"accept", b"text/html"),
    ]
    out = upstream_headers(
        incoming, 3000, drop=frozenset({"x-api-key"}), cookie="x=1", forwarded={"x-forwarded-host": "h", "x": ""}
    )
    assert out == [
        (b"host", b"localhost:3000"),
        (b"accept", b"text/html"),
        (b"cookie", b"x=1"),
        (b"x-forwarded-host", b"h"),
    ]


def test_preview_urls() -> None:
    assert preview_urls("http://127.0.0.1:8080", "localhost", "i-abc", 3000, None) == (
        "http://3000-i-abc.localhost:8080/",
        "http://127.0.0.1:8080/v1/instances/i-abc/ports/3000/",
    )
    host_url, path_url = preview_urls("https://api.example.com", "preview.example.com", "i-abc", 80, "t+k")
    assert host_url == "https://80-i-abc.preview.example.com/?cyberdesk_preview_token=t%2Bk"
    assert path_url == "https://api.example.com/v1/instances/i-abc/ports/80/?cyberdesk_preview_token=t%2Bk"
