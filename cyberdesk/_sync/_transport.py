"""The sync side's gRPC mechanics: a blocking channel, unary calls, reply streams, duplex streams.

Hand-written, the twin of cyberdesk/_async/_transport.py with the same names over a blocking
channel and threads. The generated modules of both sides reach the network only through them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from cyberdesk._channel import CLOSE_GRACE_SECONDS, END, REPLY_WINDOW, Stubs, deadline_of, open_channel, settle
from cyberdesk._config import ClientConfig
from cyberdesk._errors import from_rpc_error

T = TypeVar("T")


class Transport(Stubs):
    """A blocking channel with one stub per service; every call carries the API key."""

    def __init__(self, config: ClientConfig, timeout: float) -> None:
        super().__init__(config, timeout, open_channel(grpc, config))

    def unary(
        self, method: Callable[..., T], request: Any, timeout: float | None = None, *, deadline: bool = True
    ) -> T:
        """Call a unary (or stream-unary, given an iterator) method; errors become CyberdeskError.

        The deadline is `timeout` or the client's; `deadline=False` sets none (a command runs as
        long as it runs).
        """
        try:
            return method(request, metadata=self.metadata, timeout=deadline_of(timeout, self.timeout, deadline))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def stream(self, method: Callable[..., Any], request: Any) -> ResponseStream:
        """Start a server-streaming call; no deadline, so a long command is never cut off by one."""
        try:
            return ResponseStream(method(request, metadata=self.metadata))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def duplex(self, method: Callable[..., Any], first: Any) -> DuplexStream:
        """Start a bidirectional call whose first request is `first`."""
        return DuplexStream(self, method, first)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self.channel.close()


class ResponseStream:
    """The replies of a server-streaming call (`for`); errors become CyberdeskError.

    After `cancel()` the iteration ends quietly instead of raising Cancelled.
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False

    def __iter__(self) -> Iterator[Any]:
        return self._replies()

    def _replies(self) -> Iterator[Any]:
        try:
            yield from self._call
        except grpc.RpcError as err:
            if not (self._cancelled and err.code() is grpc.StatusCode.CANCELLED):
                raise from_rpc_error(err) from None

    def cancel(self) -> None:
        """End the call (a no-op once it has ended)."""
        self._cancelled = True
        self._call.cancel()


class DuplexStream:
    """A bidirectional call: `write` requests, `read` replies with a timeout.

    Requests go through a queue that gRPC's request iterator drains; one reader thread moves
    replies into a second queue, so `read` can wait with a timeout. The reply queue ends with END
    (the call ended, or was closed by us) or a CyberdeskError, which stay in the queue so that
    every later read sees them too. At most REPLY_WINDOW replies wait in it (`_room`); the end and
    an error always fit.
    """

    def __init__(self, transport: Transport, method: Callable[..., Any], first: Any) -> None:
        self._closed = False
        self._requests: queue.Queue[Any] = queue.Queue()
        self._requests.put(first)
        self._replies: queue.Queue[Any] = queue.Queue()
        self._room = threading.Semaphore(REPLY_WINDOW)
        self._call = method(self._request_iter(), metadata=transport.metadata)
        self._reader = threading.Thread(target=self._read_all, name="cyberdesk-stream", daemon=True)
        self._reader.start()

    def _request_iter(self) -> Iterator[Any]:
        while (item := self._requests.get()) is not END:
            yield item

    def _read_all(self) -> None:
        try:
            for reply in self._call:
                if self._closed:
                    continue  # nobody reads any more: drain the call to its end
                self._room.acquire()
                self._replies.put(reply)
            self._replies.put(END)
        except grpc.RpcError as err:
            self._replies.put(END if self._closed else from_rpc_error(err))

    def write(self, request: Any) -> None:
        """Send one request (queued; gRPC sends it from its own thread)."""
        self._requests.put(request)

    def read(self, timeout: float | None = None) -> Any | None:
        """The next reply; None once the call has ended. TimeoutError after `timeout` s (the call goes on)."""
        try:
            item = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no reply within {timeout} s") from None
        reply = settle(item, self._replies.put)
        if reply is not None:
            self._room.release()
        return reply

    def close(self, farewell: Any | None = None, grace: float = CLOSE_GRACE_SECONDS) -> None:
        """End the call and wait (up to 5 s) for the reader to stop.

        With `farewell`, the call is ended the way its service defines (a last request, then a
        half-close) and the server gets up to `grace` s to end it before it is cancelled: a
        cancelled call may drop requests still in flight.
        """
        if self._closed:
            return
        self._closed = True
        self._room.release()  # a reader waiting for room goes on (and drops what comes)
        if farewell is not None and self._reader.is_alive():
            self._requests.put(farewell)
            self._requests.put(END)
            self._reader.join(grace)
        else:
            self._requests.put(END)
        self._call.cancel()
        self._reader.join(5)
