"""gateway_svc.rest.desktop_links: viewer tokens (signed with the preview tokens' code), routes, URLs."""

from __future__ import annotations

import pytest

from cyberdesk_common.status import RpcError
from gateway_svc.rest import desktop_links
from gateway_svc.rest.desktop_links import ViewerGrant
from gateway_svc.rest.preview_links import PreviewGrant, PreviewTokens

NOW = 1_800_000_000
TOKENS = PreviewTokens(b"s" * 32)


def test_a_token_round_trips_its_grant() -> None:
    grant = ViewerGrant("t-1", "i-abc", True, NOW + 60)
    assert desktop_links.verify(TOKENS, desktop_links.mint(TOKENS, grant), NOW) == grant


def test_expired_forged_and_other_secret_tokens_are_refused() -> None:
    token = desktop_links.mint(TOKENS, ViewerGrant("t-1", "i-abc", True, NOW + 60))
    with pytest.raises(RpcError, match="expired"):
        desktop_links.verify(TOKENS, token, NOW + 60)
    payload, mac = token.split(".")
    with pytest.raises(RpcError, match="not valid"):
        desktop_links.verify(TOKENS, payload[:-2] + "AA." + mac, NOW)
    with pytest.raises(RpcError, match="not valid"):
        desktop_links.verify(PreviewTokens(b"o" * 32), token, NOW)
    with pytest.raises(RpcError, match="not valid"):
        desktop_links.verify(TOKENS, "", NOW)


def test_a_preview_token_is_no_viewer_token_and_back() -> None:
    preview = TOKENS.mint(PreviewGrant("t-1", "i-abc", 5900, NOW + 60, True))
    with pytest.raises(RpcError, match="viewer token is not valid"):
        desktop_links.verify(TOKENS, preview, NOW)
    viewer = desktop_links.mint(TOKENS, ViewerGrant("t-1", "i-abc", False, NOW + 60))
    with pytest.raises(RpcError, match="preview token is not valid"):
        TOKENS.verify(viewer, NOW)


def test_routes_and_urls() -> None:
    assert desktop_links.match_stream("/v1/instances/i-abc/desktop:stream") == "i-abc"
    assert desktop_links.match_stream("/v1/instances/i-abc/desktop:streamx") is None
    assert desktop_links.match_stream("/v1/instances/../desktop:stream") is None
    assert desktop_links.match_page("/desktop/i-abc") == "i-abc"
    assert desktop_links.match_page("/desktop/static/viewer.js") is None
    page, ws = desktop_links.viewer_urls("https://gw.example:8443/", "i-abc", "p.m")
    assert page == "https://gw.example:8443/desktop/i-abc#token=p.m"
    assert ws == "wss://gw.example:8443/v1/instances/i-abc/desktop:stream"
    assert desktop_links.token_from_subprotocols(["binary", "cyberdesk.viewer.p.m"]) == "p.m"
    assert desktop_links.token_from_subprotocols(["binary"]) == ""
