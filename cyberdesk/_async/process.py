"""`AsyncProcess`: a process running in an instance, found by pid (and tag, when it has one)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from cyberdesk._async._transport import AsyncResponseStream, AsyncTransport
from cyberdesk._models import ExecEvent, ExecResult, ResultCollector, event_from_proto
from cyberdesk._requests import selector, signal_number
from cyberdesk_proto.v1 import process_pb2


async def process_events(stream: AsyncResponseStream) -> AsyncIterator[ExecEvent]:
    """The SDK events of a StartProcess or ConnectProcess stream (keepalives left out)."""
    async for reply in stream:
        event = event_from_proto(reply.event)
        if event is not None:
            yield event


class AsyncProcess:
    """A process running in an instance, found by pid (and tag, when it has one)."""

    def __init__(self, transport: AsyncTransport, instance_id: str, pid: int, tag: str = "") -> None:
        self._t = transport
        self.instance_id = instance_id
        self.pid = pid
        self.tag = tag

    def _selector(self) -> process_pb2.ProcessSelector:
        return selector(self.pid, None) if self.pid else selector(None, self.tag)

    async def events(self, *, skip_replay: bool = False) -> AsyncIterator[ExecEvent]:
        """Reattach: the buffered output (unless skip_replay), then live events until exit.

        Leaving the iteration early never stops the process.
        """
        request = process_pb2.ConnectProcessRequest(
            instance_id=self.instance_id, selector=self._selector(), skip_replay=skip_replay
        )
        stream = self._t.stream(self._t.process.ConnectProcess, request)
        try:
            async for event in process_events(stream):
                yield event
        finally:
            stream.cancel()

    async def wait(self) -> ExecResult:
        """Wait for the process to exit and collect its (buffered and later) output."""
        collector = ResultCollector()
        async for event in self.events():
            collector.add(event)
        if not collector.pid:
            collector.pid = self.pid
        return collector.result()

    async def send_stdin(self, data: bytes | str) -> None:
        """Write to the process's stdin (started with keep_stdin_open=True)."""
        payload = data.encode() if isinstance(data, str) else data
        request = process_pb2.SendProcessInputRequest(
            instance_id=self.instance_id, selector=self._selector(), data=payload
        )
        await self._t.unary(self._t.process.SendProcessInput, request)

    async def close_stdin(self) -> None:
        """Close the process's stdin so that it reads end-of-file."""
        request = process_pb2.CloseProcessStdinRequest(instance_id=self.instance_id, selector=self._selector())
        await self._t.unary(self._t.process.CloseProcessStdin, request)

    async def signal(self, sig: int | str) -> None:
        """Send a signal ("TERM", "INT", "KILL"... or its number) to the process group."""
        request = process_pb2.SendProcessSignalRequest(
            instance_id=self.instance_id,
            selector=self._selector(),
            signal=signal_number(sig),  # type: ignore[arg-type]
        )
        await self._t.unary(self._t.process.SendProcessSignal, request)

    async def kill(self) -> None:
        """SIGKILL the process group."""
        await self.signal("KILL")

    def __repr__(self) -> str:
        return f"AsyncProcess(instance_id={self.instance_id!r}, pid={self.pid}, tag={self.tag!r})"
