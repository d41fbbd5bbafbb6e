"""Pure parts of the gateway: the wire scan, key extraction, limits, Unkey mapping, metadata rules."""

from __future__ import annotations

import grpc
import pytest
from unkey.py import models

from cyberdesk_common.status import RpcError
from cyberdesk_proto.internal.v1 import auth_pb2
from cyberdesk_proto.v1 import filesystem_pb2, process_pb2
from gateway_svc.auth import Principal, extract_key, require_scope
from gateway_svc.proxy import forwardable, public_methods
from gateway_svc.ratelimit import Limit, parse_limit
from gateway_svc.routing import WireError, parse_event, read_instance_id
from gateway_svc.unkey_backend import map_verify_data


def test_read_instance_id_of_real_messages() -> None:
    req = process_pb2.StartProcessRequest(instance_id="i-abc", argv=["echo", "hi"], env={"A": "B"})
    assert read_instance_id(req.SerializeToString()) == "i-abc"
    upload = filesystem_pb2.UploadFileRequest(instance_id="i-ü", chunk=b"x" * 100_000)
    assert read_instance_id(upload.SerializeToString()) == "i-ü"
    assert read_instance_id(process_pb2.StartProcessRequest(argv=["ls"]).SerializeToString()) == ""
    assert read_instance_id(b"") == ""


def test_read_instance_id_skips_every_wire_type_and_takes_the_last_field_1() -> None:
    # field 2 varint (300), field 3 fixed64, field 4 fixed32, field 1 "a", field 1 "bb"
    data = bytes([0x10, 0xAC, 0x02, 0x19]) + b"\0" * 8 + bytes([0x25]) + b"\0" * 4
    data += bytes([0x0A, 1]) + b"a" + bytes([0x0A, 2]) + b"bb"
    assert read_instance_id(data) == "bb"


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x0A, 5]) + b"ab",  # length past the end
        bytes([0x0A]),  # truncated length
        bytes([0x08, 1]),  # field 1 as a varint
        bytes([0x0A, 1, 0xFF]),  # not UTF-8
        bytes([0x0B]),  # group wire type
        bytes([0x10]) + b"\xff" * 11,  # endless varint
    ],
)
def test_read_instance_id_rejects_malformed_bytes(data: bytes) -> None:
    with pytest.raises(WireError):
        read_instance_id(data)


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


def test_parse_limit() -> None:
    assert parse_limit("100/1s") == Limit(100, 1.0)
    assert parse_limit("6000/m") == Limit(6000, 60.0)
    assert parse_limit("10 / 500ms") == Limit(10, 0.5)
    for bad in ("100", "0/1s", "5/0s", "ten/1s", "5/1d"):
        with pytest.raises(ValueError, match=r"rate limit|positive"):
            parse_limit(bad)


def test_public_methods_cover_every_shape() -> None:
    methods = public_methods()
    assert not methods["/cyberdesk.v1.ProcessService/StartProcess"].client_streaming
    assert methods["/cyberdesk.v1.ProcessService/StartProcess"].server_streaming
    assert methods["/cyberdesk.v1.FilesystemService/UploadFile"].client_streaming
    assert methods["/cyberdesk.v1.ProcessService/ConnectPty"].client_streaming
    assert "/cyberdesk.v1.InstanceService/GetInstance" in methods
    assert not any(path.startswith("/cyberdesk.internal") for path in methods)


def test_forwardable_strips_credentials_and_claims() -> None:
    incoming = [
        ("authorization", "Bearer cd_x"),
        ("x-api-key", "cd_x"),
        ("x-cyberdesk-tenant", "someone-else"),
        ("x-cyberdesk-internal-token", "guess"),
        ("traceparent", "00-x"),
        ("user-agent", "grpc-python"),
        ("x-request-id", "r1"),
    ]
    assert forwardable(incoming) == [("x-request-id", "r1")]


def test_parse_event() -> None:
    assert parse_event({b"instance_id": b"i-1", b"state": b"PAUSED"}) == ("i-1", "PAUSED")
    assert parse_event({b"kind": b"other"}) is None


def _unkey(**data: object) -> models.V2KeysVerifyKeyResponseData:
    return models.V2KeysVerifyKeyResponseData.model_validate(data)


def test_unkey_mapping() -> None:
    valid = map_verify_data(
        _unkey(
            valid=True,
            code="VALID",
            keyId="key_1",
            identity={"id": "id_1", "externalId": "tenant-a"},
            ratelimits=[
                {
                    "exceeded": False,
                    "id": "rl",
                    "name": "requests",
                    "limit": 10,
                    "duration": 1000,
                    "reset": 500,
                    "remaining": 9,
                    "autoApply": True,
                }
            ],
        )
    )
    assert valid.code == auth_pb2.VERIFY_CODE_VALID and valid.cacheable
    assert valid.principal == Principal("key_1", "tenant-a", frozenset({"instances"}), Limit(10, 1.0), -1)
    credits = map_verify_data(_unkey(valid=True, code="VALID", keyId="k", meta={"tenant_id": "t"}, credits=3))
    assert credits.principal is not None and credits.principal.remaining_credits == 3 and not credits.cacheable
    assert map_verify_data(_unkey(valid=False, code="DISABLED")).code == auth_pb2.VERIFY_CODE_REVOKED
    no_tenant = map_verify_data(_unkey(valid=True, code="VALID", keyId="k"))
    assert no_tenant.to_error() is not None and no_tenant.to_error().code is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[union-attr]
