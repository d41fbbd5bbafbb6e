"""`instance.shell()`: an interactive terminal session over ConnectPty."""

# `timeout` arguments bound a wait for output, measured against a deadline the loop recomputes;
# asyncio.timeout() is no substitute on the generated sync side.
# ruff: noqa: ASYNC109
from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator

from cyberdesk._async._transport import AsyncTransport
from cyberdesk._errors import CyberdeskError, DeadlineExceeded
from cyberdesk._models import Exited, exited_from_proto
from cyberdesk._requests import signal_number
from cyberdesk_proto.v1 import process_pb2


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class AsyncShell:
    """A terminal in an instance: `send` keystrokes, `recv` output, `resize`, `wait`, `close`.

    Replies are taken from the stream one at a time by whoever reads (`recv`, iteration, `wait`):
    output is queued in `_pending` until `recv` hands it out, so `wait` never loses output.
    Read from one thread (or task) at a time; `send`, `resize` and `signal` may come from another.
    """

    def __init__(self, transport: AsyncTransport, first: process_pb2.ConnectPtyRequest) -> None:
        self._t = transport
        self._stream = transport.duplex(transport.process.ConnectPty, first)
        self._pending: deque[bytes] = deque()
        self._ended = False
        self._closed = False
        self.pid = 0
        self.exited: Exited | None = None
        self.error: CyberdeskError | None = None

    async def _open(self) -> AsyncShell:
        """Wait until the terminal has started (its pid is known)."""
        try:
            while not self.pid and not self._ended:
                await self._take(self._t.timeout)
        except TimeoutError:
            await self.close()
            raise DeadlineExceeded(f"the terminal did not open within {self._t.timeout} s") from None
        return self

    async def _take(self, timeout: float | None) -> None:
        """Read one reply and file it (output, started, exited, end); TimeoutError after `timeout` s."""
        try:
            reply = await self._stream.read(timeout)
        except CyberdeskError as err:
            self._ended = True
            if not self._closed:
                self.error = err
                raise
            return
        if reply is None:
            self._ended = True
            return
        kind = reply.WhichOneof("event")
        if kind == "output":
            self._pending.append(reply.output)
        elif kind == "started":
            self.pid = reply.started.pid
        elif kind == "exited":
            self.exited = exited_from_proto(reply.exited)

    @property
    def exit_code(self) -> int | None:
        """The shell's exit code once it has ended."""
        return self.exited.exit_code if self.exited else None

    async def send(self, data: bytes | str) -> None:
        """Send keystrokes (text is UTF-8 encoded)."""
        payload = data.encode() if isinstance(data, str) else data
        await self._stream.write(process_pb2.ConnectPtyRequest(input=payload))

    async def resize(self, cols: int, rows: int) -> None:
        """Tell the terminal its new size."""
        await self._stream.write(process_pb2.ConnectPtyRequest(resize=process_pb2.PtySize(cols=cols, rows=rows)))

    async def signal(self, sig: int | str) -> None:
        """Send a signal to the terminal's foreground process group."""
        request = process_pb2.ConnectPtyRequest(signal=signal_number(sig))  # type: ignore[arg-type]
        await self._stream.write(request)

    async def recv(self, timeout: float | None = None) -> bytes:
        """The next output bytes; b"" once the terminal has ended. Raises TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            if self._ended:
                if self.error is not None:
                    raise self.error
                return b""
            try:
                await self._take(_remaining(deadline))
            except TimeoutError:
                raise TimeoutError(f"no terminal output within {timeout} s") from None
        return self._pending.popleft()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.recv():
            yield chunk

    async def wait(self, timeout: float | None = None) -> Exited | None:
        """Wait until the terminal ends; its exit (None if the stream broke off or `timeout` s passed).

        Output that arrives meanwhile is kept for `recv`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._ended:
                await self._take(_remaining(deadline))
        except (TimeoutError, CyberdeskError):
            pass  # the error stays in `error` (and `recv` raises it)
        return self.exited

    async def close(self) -> None:
        """Leave the terminal (it ends unless opened with background=True)."""
        if self._closed:
            return
        self._closed = True
        # Detach rather than cancel: keystrokes sent just before still reach the terminal.
        detach = process_pb2.ConnectPtyRequest(detach=process_pb2.PtyDetach())
        await self._stream.close(farewell=detach if self.pid and not self._ended else None)

    async def __aenter__(self) -> AsyncShell:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
