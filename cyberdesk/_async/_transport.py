"""The async side's gRPC mechanics: a grpc.aio channel, unary calls, reply streams, duplex streams.

Hand-written, with a twin of the same names in cyberdesk/_sync/_transport.py (a blocking channel
and threads). The generated modules of both sides reach the network only through these names, so
this file and its twin hold everything that differs between asyncio and threads for a call.
"""

# `timeout` here is a gRPC deadline, not the coroutine's own; asyncio.timeout() is no substitute.
# ruff: noqa: ASYNC109
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from cyberdesk._channel import CLOSE_GRACE_SECONDS, END, REPLY_WINDOW, Stubs, deadline_of, open_channel, settle
from cyberdesk._client_stream import stream_unary_result
from cyberdesk._config import ClientConfig
from cyberdesk._errors import from_rpc_error


class AsyncTransport(Stubs):
    """A grpc.aio channel with one stub per service; every call carries the API key."""

    def __init__(self, config: ClientConfig, timeout: float) -> None:
        super().__init__(config, timeout, open_channel(grpc.aio, config))

    async def unary(
        self, method: Callable[..., Any], request: Any, timeout: float | None = None, *, deadline: bool = True
    ) -> Any:
        """Await a unary (or stream-unary, given an async iterator) call; errors become CyberdeskError.

        The deadline is `timeout` or the client's; `deadline=False` sets none (a command runs as
        long as it runs).
        """
        try:
            call = method(request, metadata=self.metadata, timeout=deadline_of(timeout, self.timeout, deadline))
            return await (stream_unary_result(call) if hasattr(request, "__aiter__") else call)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def stream(self, method: Callable[..., Any], request: Any) -> AsyncResponseStream:
        """Start a server-streaming call; no deadline, so a long command is never cut off by one."""
        return AsyncResponseStream(method(request, metadata=self.metadata))

    def duplex(self, method: Callable[..., Any], first: Any) -> AsyncDuplexStream:
        """Start a bidirectional call whose first request is `first` (call from a coroutine)."""
        return AsyncDuplexStream(method(metadata=self.metadata), first)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self.channel.close(None)


class AsyncResponseStream:
    """The replies of a server-streaming call (`async for`); errors become CyberdeskError.

    After `cancel()` the iteration ends quietly: grpc.aio reports a locally cancelled call as
    asyncio.CancelledError, which must not be mistaken for the cancellation of the caller's task,
    hence the flag.
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._replies()

    async def _replies(self) -> AsyncIterator[Any]:
        try:
            async for reply in self._call:
                yield reply
        except grpc.RpcError as err:
            if not (self._cancelled and err.code() is grpc.StatusCode.CANCELLED):
                raise from_rpc_error(err) from None
        except asyncio.CancelledError:
            if not self._cancelled:
                raise

    def cancel(self) -> None:
        """End the call (a no-op once it has ended)."""
        self._cancelled = True
        self._call.cancel()


class AsyncDuplexStream:
    """A bidirectional call: `write` requests, `read` replies with a timeout.

    A reader task moves replies into a queue as they come. `read` waits on the queue, never on the
    call: a timed-out `call.read()` is a cancelled coroutine, and grpc.aio cancels the whole call
    with it. The queue ends with END (the call ended, or was closed by us) or a CyberdeskError,
    which stay in the queue so that every later read sees them too. At most REPLY_WINDOW replies
    wait in it (`_room`); the end and an error always fit.
    """

    def __init__(self, call: Any, first: Any) -> None:
        self._call = call
        self._closed = False
        self._replies: asyncio.Queue[Any] = asyncio.Queue()
        self._room = asyncio.Semaphore(REPLY_WINDOW)
        self._reader = asyncio.get_running_loop().create_task(self._read_all(first))

    async def _read_all(self, first: Any) -> None:
        try:
            await self._call.write(first)
            async for reply in self._call:
                if self._closed:
                    continue  # nobody reads any more: drain the call to its end
                await self._room.acquire()
                self._replies.put_nowait(reply)
            self._replies.put_nowait(END)
        except grpc.RpcError as err:
            self._replies.put_nowait(END if self._closed else from_rpc_error(err))
        except asyncio.CancelledError:
            # Our close() cancelled the call (nobody cancels this task itself).
            self._replies.put_nowait(END)

    async def write(self, request: Any) -> None:
        """Send one request."""
        try:
            await self._call.write(request)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def read(self, timeout: float | None = None) -> Any | None:
        """The next reply; None once the call has ended. TimeoutError after `timeout` s (the call goes on)."""
        try:
            item = await asyncio.wait_for(self._replies.get(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no reply within {timeout} s") from None
        reply = settle(item, self._replies.put_nowait)
        if reply is not None:
            self._room.release()
        return reply

    async def _leave(self, farewell: Any) -> None:
        await self._call.write(farewell)
        await self._call.done_writing()
        await asyncio.shield(self._reader)  # a timeout must not cancel the reader

    async def close(self, farewell: Any | None = None, grace: float = CLOSE_GRACE_SECONDS) -> None:
        """End the call and wait for the reader to stop.

        With `farewell`, the call is ended the way its service defines (a last request, then a
        half-close) and the server gets up to `grace` s to end it before it is cancelled: a
        cancelled call may drop requests still in flight.
        """
        if self._closed:
            return
        self._closed = True
        self._room.release()  # a reader waiting for room goes on (and drops what comes)
        if farewell is not None and not self._reader.done():
            # Bounded as a whole: the write itself waits while the server reads nothing. An error
            # or a timeout means the call ended otherwise or the server took too long: cancel it.
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError, TimeoutError):
                await asyncio.wait_for(self._leave(farewell), grace)
        self._call.cancel()
        await self._reader
