"""The CORS rules without sockets: the setting, origins, preflight and response headers, the WebSocket check."""

from __future__ import annotations

import pytest

from gateway_svc.rest.cors import CorsPolicy, is_preflight, normalize_origin


def test_the_setting() -> None:
    assert not CorsPolicy.parse("").enabled
    assert CorsPolicy.parse(" * ").any_origin
    policy = CorsPolicy.parse("https://App.example.com/, http://localhost:5173,http://a.test:80")
    assert policy.origins == {"https://app.example.com", "http://localhost:5173", "http://a.test"}
    for bad in ("app.example.com", "https://a.test/path", "ftp://a.test", "*,https://a.test", "http://a.test:99999"):
        with pytest.raises(ValueError):
            CorsPolicy.parse(bad)


def test_origins_allowed_and_not() -> None:
    policy = CorsPolicy.parse("http://localhost:5173")
    assert policy.allow_origin("http://localhost:5173") == "http://localhost:5173"
    assert policy.allow_origin("http://LOCALHOST:5173") == "http://LOCALHOST:5173"  # echoed as sent
    assert policy.allow_origin("http://localhost:5174") is None
    assert policy.allow_origin("null") is None
    assert policy.allow_origin(None) is None
    assert CorsPolicy.parse("*").allow_origin("http://anything.test") == "*"
    assert CorsPolicy().allow_origin("http://localhost:5173") is None


def test_headers() -> None:
    policy = CorsPolicy.parse("http://localhost:5173")
    pre = dict(policy.preflight_headers("http://localhost:5173") or [])
    assert b"authorization" in pre[b"access-control-allow-headers"]
    assert b"range" in pre[b"access-control-allow-headers"]
    assert pre[b"vary"] == b"origin"
    assert policy.preflight_headers("http://other.test") is None
    actual = dict(policy.response_headers("http://localhost:5173"))
    assert b"x-cyberdesk-sha256" in actual[b"access-control-expose-headers"]
    assert dict(policy.response_headers("http://other.test")) == {b"vary": b"origin"}
    star = dict(CorsPolicy.parse("*").response_headers("http://x.test"))
    assert star[b"access-control-allow-origin"] == b"*" and b"vary" not in star
    assert all(b"credentials" not in name for name in star)


def test_preflight_and_websocket_rules() -> None:
    assert is_preflight("OPTIONS", {"origin": "http://a.test", "access-control-request-method": "POST"})
    assert not is_preflight("OPTIONS", {"origin": "http://a.test"})
    policy = CorsPolicy.parse("http://localhost:5173")
    assert policy.websocket_allowed({}, "ws")
    assert policy.websocket_allowed({"origin": "http://localhost:5173", "host": "127.0.0.1:8080"}, "ws")
    assert policy.websocket_allowed({"origin": "http://127.0.0.1:8080", "host": "127.0.0.1:8080"}, "ws")
    assert not policy.websocket_allowed({"origin": "https://127.0.0.1:8080", "host": "127.0.0.1:8080"}, "ws")
    assert not policy.websocket_allowed({"origin": "http://evil.test", "host": "127.0.0.1:8080"}, "ws")
    assert CorsPolicy().websocket_allowed({"origin": "https://gw.test", "host": "gw.test"}, "wss")
    assert normalize_origin("HTTPS://[::1]:443") == "https://[::1]"
