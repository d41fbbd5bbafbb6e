"""Mapping Unkey's verify answers to our Verification (gateway_svc/unkey_backend.py), in-process."""

from __future__ import annotations

import grpc
from unkey.py import models

from cyberdesk_proto.internal.v1 import auth_pb2
from gateway_svc.auth import Principal
from gateway_svc.ratelimit import Limit
from gateway_svc.unkey_backend import map_verify_data


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
