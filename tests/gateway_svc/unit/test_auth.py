"""API key extraction from metadata and scope checks (gateway_svc/auth.py), in-process."""

from __future__ import annotations

import grpc
import pytest

from cyberdesk_common.status import RpcError
from gateway_svc.auth import Principal, extract_key, require_scope


def test_extract_key() -> None:
    assert extract_key([("authorization", "Bearer cd_x")]) == "cd_x"
    assert extract_key([("x-api-key", "cd_y")]) == "cd_y"
    for bad in ([], [("authorization", "Basic abc")], [("authorization", "Bearer ")], [("x-api-key", " ")]):
        with pytest.raises(RpcError) as err:
            extract_key(bad)
        assert err.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_scopes() -> None:
    require_scope(Principal("k", "t", frozenset({"instances"})), "instances")
    require_scope(Principal("k", "t", frozenset({"admin"})), "instances")
    with pytest.raises(RpcError) as err:
        require_scope(Principal("k", "t", frozenset({"instances"})), "admin")
    assert err.value.code is grpc.StatusCode.PERMISSION_DENIED
