"""Awaiting a grpc.aio client-streaming call so that the server's status is what the caller gets.

grpc.aio (1.85) writes a call's requests from a task of its own. When the server ends the call
while one of those writes is in flight (an agent refusing an upload after its header), the write
fails and grpc sets the call's status to INTERNAL "Internal error from Core", also when the
server's status had already come in, so the caller saw INTERNAL instead of, say, ALREADY_EXISTS:
8 of 1,500 refused uploads on loopback, and a REST PUT answered 500 instead of 409 beside a CPU
hog. Every status grpc sets on a call passes through the call's done callbacks, so the server's
own is kept there and raised in place of that INTERNAL.

Shared by the async SDK (an upload the gateway refuses) and the gateway (an upload the agent
refuses, on its gRPC and REST faces), which depends on this distribution. Blocking grpc does not
do this (1,500 of 1,500 refusals kept their status), so the sync SDK needs nothing.
"""

from __future__ import annotations

from typing import Any

import grpc

CORE_WRITE_FAILURE = "Internal error from Core"
_CODES = {code.value[0]: code for code in grpc.StatusCode}


async def stream_unary_result(call: Any) -> Any:
    """The response of the stream-unary `call`, or its AioRpcError with the server's status."""
    statuses: list[Any] = []

    def witness(done: Any) -> None:
        # The status object grpc.aio's own __await__ reads (there is no public synchronous getter).
        status = getattr(getattr(done, "_cython_call", None), "_status", None)
        if status is not None and status.details() != CORE_WRITE_FAILURE:
            statuses.append(status)

    call.add_done_callback(witness)
    try:
        return await call
    except grpc.aio.AioRpcError as err:
        if err.code() is not grpc.StatusCode.INTERNAL or err.details() != CORE_WRITE_FAILURE or not statuses:
            raise
        status = statuses[0]
        trailers: Any = status.trailing_metadata() or ()
        raise grpc.aio.AioRpcError(
            _CODES.get(status.code(), grpc.StatusCode.UNKNOWN),
            err.initial_metadata(),
            grpc.aio.Metadata.from_tuple(trailers),
            status.details(),
            status.debug_error_string(),
        ) from None
