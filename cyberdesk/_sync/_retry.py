"""The sync side's waiting and call plumbing for retried calls (watch, create).

Hand-written, the twin of cyberdesk/_async/_retry.py with the same names over blocking grpc.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc


def sleep(seconds: float) -> None:
    """Wait `seconds`."""
    time.sleep(seconds)


def replies(call: Any, cancelled: list[bool]) -> Iterator[Any]:
    """The replies of a server-streaming call; ends quietly once `cancelled[0]` (we cancelled it).

    Blocking grpc reports a call we cancelled as an RpcError with CANCELLED. Other failures raise
    grpc.RpcError.
    """
    try:
        yield from call
    except grpc.RpcError as err:
        if not (cancelled[0] and err.code() is grpc.StatusCode.CANCELLED):
            raise
