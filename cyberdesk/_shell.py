"""`instance.shell()`: an interactive terminal session over ConnectPty (blocking)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from cyberdesk._errors import CyberdeskError, DeadlineExceeded
from cyberdesk._models import Exited, exited_from_proto
from cyberdesk._requests import signal_number
from cyberdesk._transport import Transport, iterate
from cyberdesk_proto.v1 import process_pb2

_END = object()


class Shell:
    """A terminal in an instance: `send` keystrokes, `recv` output, `resize`, `close`.

    One reader thread moves output from the stream into a queue, so `recv` can wait with a
    timeout; requests go through a second queue that the gRPC request iterator drains.
    """

    def __init__(self, transport: Transport, first: process_pb2.ConnectPtyRequest) -> None:
        self._t = transport
        self._instance_id = first.instance_id
        self._requests: queue.Queue[Any] = queue.Queue()
        self._requests.put(first)
        self._output: queue.Queue[Any] = queue.Queue()
        self._call = transport.stream(transport.process.ConnectPty, self._request_iter())
        self.pid = 0
        self.exited: Exited | None = None
        self.error: CyberdeskError | None = None
        self._closed = False
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, name="cyberdesk-shell", daemon=True)
        self._reader.start()
        if not self._started.wait(transport.timeout):
            self.close()
            raise DeadlineExceeded(f"the terminal did not open within {transport.timeout} s")
        if self.error is not None:
            raise self.error

    def _request_iter(self) -> Iterator[process_pb2.ConnectPtyRequest]:
        while (item := self._requests.get()) is not _END:
            yield item

    def _read(self) -> None:
        try:
            for reply in iterate(self._call):
                kind = reply.WhichOneof("event")
                if kind == "output":
                    self._output.put(reply.output)
                elif kind == "started":
                    self.pid = reply.started.pid
                    self._started.set()
                elif kind == "exited":
                    self.exited = exited_from_proto(reply.exited)
        except CyberdeskError as err:
            if not self._closed:
                self.error = err
        finally:
            self._started.set()
            self._output.put(_END)

    @property
    def exit_code(self) -> int | None:
        """The shell's exit code once it has ended."""
        return self.exited.exit_code if self.exited else None

    def send(self, data: bytes | str) -> None:
        """Send keystrokes (text is UTF-8 encoded)."""
        payload = data.encode() if isinstance(data, str) else data
        self._requests.put(process_pb2.ConnectPtyRequest(input=payload))

    def resize(self, cols: int, rows: int) -> None:
        """Tell the terminal its new size."""
        self._requests.put(process_pb2.ConnectPtyRequest(resize=process_pb2.PtySize(cols=cols, rows=rows)))

    def signal(self, sig: int | str) -> None:
        """Send a signal to the terminal's foreground process group."""
        self._requests.put(process_pb2.ConnectPtyRequest(signal=signal_number(sig)))  # type: ignore[arg-type]

    def recv(self, timeout: float | None = None) -> bytes:
        """The next output bytes; b"" once the terminal has ended. Raises TimeoutError after `timeout` s."""
        try:
            item = self._output.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no terminal output within {timeout} s") from None
        if item is _END:
            self._output.put(_END)  # every later recv sees the end too
            if self.error is not None:
                raise self.error
            return b""
        data: bytes = item
        return data

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.recv():
            yield chunk

    def wait(self, timeout: float | None = None) -> Exited | None:
        """Wait until the terminal ends; its exit (None if the stream broke off)."""
        self._reader.join(timeout)
        return self.exited

    def close(self) -> None:
        """Leave the terminal (it ends unless opened with background=True)."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(_END)
        self._call.cancel()
        self._reader.join(5)

    def __enter__(self) -> Shell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
