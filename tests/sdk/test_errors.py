"""Status codes the SDK has no class for (pure; the client-side mapping is tested for both clients
in tests/sdk/_async/test_errors.py and its generated sync twin)."""

from __future__ import annotations

import grpc

from cyberdesk import CyberdeskError
from cyberdesk._errors import error_from_status


def test_unmapped_code_is_base_class() -> None:
    err = error_from_status(grpc.StatusCode.ABORTED, "conflict")
    assert type(err) is CyberdeskError and err.code is grpc.StatusCode.ABORTED
