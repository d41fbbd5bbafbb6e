"""`client.instances.watch()`: every lifecycle change, once and in order, across disconnects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from cyberdesk._async import _retry
from cyberdesk._async._transport import AsyncTransport
from cyberdesk._errors import CyberdeskError, error_from_status
from cyberdesk._watch import WATCH_CURSOR_HEADER, Backoff, InstanceEvent, resumable
from cyberdesk_proto.v1 import instance_pb2


class AsyncInstanceWatch:
    """The caller's lifecycle changes (`InstanceEvent`), iterated as they happen.

    When the watch ends with UNAVAILABLE (the event store, instance_svc or the gateway restarting,
    a dropped connection) it is opened again with back-off from the cursor of the last change
    received, or from where it started when none came yet; the server replays what was missed,
    so the iteration sees every change exactly once, in order. It gives up (raising Unavailable)
    after `give_up_after` seconds without a successful reconnect. `cursor` is the position to
    resume after (`InstanceEvent.cursor`); `close()` ends the watch.
    """

    def __init__(self, transport: AsyncTransport, instance_id: str, cursor: str, give_up_after: float) -> None:
        self._t = transport
        self._instance_id = instance_id
        self.cursor = cursor  # the last change delivered (or where the watch started)
        self._backoff = Backoff(give_up_after=give_up_after)
        self._call: Any = None
        self._cancelled = [False]
        self.reconnects = 0  # how many times the watch was opened again

    async def _open(self) -> CyberdeskError | None:
        """Open the call and wait until the server's watch is in place; the error when it is not."""
        request = instance_pb2.WatchInstancesRequest(instance_id=self._instance_id, cursor=self.cursor)
        call = self._t.instances.WatchInstances(request, metadata=self._t.metadata)
        self._call = call
        headers = dict(await call.initial_metadata() or ())
        start = headers.get(WATCH_CURSOR_HEADER)
        if isinstance(start, str) and start:
            self.cursor = start
            return None
        # No headers from our server: the call failed before the watch was in place.
        code = await call.code()
        return error_from_status(code, await call.details() or "", await call.trailing_metadata())

    async def _start(self) -> None:
        """The first open: any failure is the caller's to see."""
        error = await self._open()
        if error is not None:
            raise error

    async def _reopen(self, error: CyberdeskError) -> None:
        """Open again after a resumable end, waiting with back-off; raises once it gives up."""
        while True:
            delay = self._backoff.next_delay()
            if delay is None:
                raise error
            await _retry.sleep(delay)
            if self._cancelled[0]:
                return
            self.reconnects += 1
            failed = await self._open()
            if failed is None:
                return
            if not resumable(failed.code):
                raise failed
            error = failed

    def __aiter__(self) -> AsyncIterator[InstanceEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[InstanceEvent]:
        while not self._cancelled[0]:
            try:
                async for reply in _retry.replies(self._call, self._cancelled):
                    event = InstanceEvent.from_proto(reply)
                    self.cursor = event.cursor
                    self._backoff.reset()
                    yield event
                if self._cancelled[0]:
                    return
                # The server ended the watch without an error (it never does by itself): resume.
                error: CyberdeskError = error_from_status(grpc.StatusCode.UNAVAILABLE, "the watch ended")
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
                details = err.details() if hasattr(err, "details") else ""
                trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
                error = error_from_status(code, details or "", trailers)
                if not resumable(code):
                    raise error from None
            await self._reopen(error)

    async def close(self) -> None:
        """End the watch; an iteration in progress ends quietly."""
        self._cancelled[0] = True
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> AsyncInstanceWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
