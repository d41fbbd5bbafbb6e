"""The async side's waiting and call plumbing for retried calls (watch, create).

Hand-written, with a twin of the same names in cyberdesk/_sync/_retry.py: sleeping and telling a
locally cancelled call from a failed one are what differ between grpc.aio and blocking grpc.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc


async def sleep(seconds: float) -> None:
    """Wait `seconds` without blocking the loop."""
    await asyncio.sleep(seconds)


async def replies(call: Any, cancelled: list[bool]) -> AsyncIterator[Any]:
    """The replies of a server-streaming call; ends quietly once `cancelled[0]` (we cancelled it).

    grpc.aio reports a call we cancelled as asyncio.CancelledError, which must not be mistaken for
    the cancellation of the caller's task, hence the flag. Other failures raise grpc.RpcError.
    """
    try:
        async for reply in call:
            yield reply
    except asyncio.CancelledError:
        if not cancelled[0]:
            raise
    except grpc.RpcError as err:
        if not (cancelled[0] and err.code() is grpc.StatusCode.CANCELLED):
            raise
