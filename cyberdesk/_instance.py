"""`Instance`: one isolated machine and everything a caller does with it (blocking)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from cyberdesk._desktop import Desktop
from cyberdesk._files import Files
from cyberdesk._models import (
    ExecEvent,
    ExecResult,
    Exited,
    InstanceData,
    ProcessInfo,
    ResultCollector,
    Snapshot,
    Started,
    Stderr,
    Stdout,
    event_from_proto,
)
from cyberdesk._requests import Command, duration, pty_open, selector, signal_number, start_request
from cyberdesk._shell import Shell
from cyberdesk._transport import Transport, iterate
from cyberdesk_proto.v1 import instance_pb2, process_pb2

OutputCallback = Callable[[bytes], None]


def _events(call: Any) -> Iterator[ExecEvent]:
    for reply in iterate(call):
        event = event_from_proto(reply.event)
        if event is not None:
            yield event


class Process:
    """A process running in an instance, found by pid (and tag, when it has one)."""

    def __init__(self, transport: Transport, instance_id: str, pid: int, tag: str = "") -> None:
        self._t = transport
        self.instance_id = instance_id
        self.pid = pid
        self.tag = tag

    def _selector(self) -> process_pb2.ProcessSelector:
        return selector(self.pid, None) if self.pid else selector(None, self.tag)

    def events(self, *, skip_replay: bool = False) -> Iterator[ExecEvent]:
        """Reattach: the buffered output (unless skip_replay), then live events until exit.

        Leaving the iterator early never stops the process.
        """
        request = process_pb2.ConnectProcessRequest(
            instance_id=self.instance_id, selector=self._selector(), skip_replay=skip_replay
        )
        call = self._t.stream(self._t.process.ConnectProcess, request)
        try:
            yield from _events(call)
        finally:
            call.cancel()

    def wait(self) -> ExecResult:
        """Wait for the process to exit and collect its (buffered and later) output."""
        collector = ResultCollector()
        for event in self.events():
            collector.add(event)
        if not collector.pid:
            collector.pid = self.pid
        return collector.result()

    def send_stdin(self, data: bytes | str) -> None:
        """Write to the process's stdin (started with keep_stdin_open=True)."""
        payload = data.encode() if isinstance(data, str) else data
        request = process_pb2.SendProcessInputRequest(
            instance_id=self.instance_id, selector=self._selector(), data=payload
        )
        self._t.unary(self._t.process.SendProcessInput, request)

    def close_stdin(self) -> None:
        """Close the process's stdin so that it reads end-of-file."""
        request = process_pb2.CloseProcessStdinRequest(instance_id=self.instance_id, selector=self._selector())
        self._t.unary(self._t.process.CloseProcessStdin, request)

    def signal(self, sig: int | str) -> None:
        """Send a signal ("TERM", "INT", "KILL"... or its number) to the process group."""
        request = process_pb2.SendProcessSignalRequest(
            instance_id=self.instance_id,
            selector=self._selector(),
            signal=signal_number(sig),  # type: ignore[arg-type]
        )
        self._t.unary(self._t.process.SendProcessSignal, request)

    def kill(self) -> None:
        """SIGKILL the process group."""
        self.signal("KILL")

    def __repr__(self) -> str:
        return f"Process(instance_id={self.instance_id!r}, pid={self.pid}, tag={self.tag!r})"


class Instance:
    """An isolated machine. Used as a context manager, it is deleted when the block ends.

    Attributes mirror the API's Instance as last read (`refresh()` reads it again).
    """

    def __init__(self, transport: Transport, data: InstanceData) -> None:
        self._t = transport
        self.data = data
        self.files = Files(transport, data.id)
        self.desktop = Desktop(transport, data.id)

    @property
    def id(self) -> str:
        """The instance id, e.g. "i-7f3a9c2e1b4d"."""
        return self.data.id

    @property
    def state(self) -> str:
        """The state as last read: PENDING, STARTING, RUNNING, PAUSED, STOPPING, TERMINATED, FAILED."""
        return self.data.state

    def __repr__(self) -> str:
        return f"Instance(id={self.id!r}, state={self.state!r}, template={self.data.template!r})"

    def _update(self, proto: instance_pb2.Instance) -> Instance:
        self.data = InstanceData.from_proto(proto)
        return self

    # --- lifecycle ---

    def refresh(self) -> Instance:
        """Read the instance again."""
        request = instance_pb2.GetInstanceRequest(instance_id=self.id)
        return self._update(self._t.unary(self._t.instances.GetInstance, request).instance)

    def set_timeout(self, seconds: float) -> Instance:
        """Move the deadline to now + seconds."""
        request = instance_pb2.SetInstanceTimeoutRequest(instance_id=self.id, timeout=duration(seconds, "timeout"))
        return self._update(self._t.unary(self._t.instances.SetInstanceTimeout, request).instance)

    def pause(self) -> Instance:
        """Freeze every process (FailedPrecondition where the runtime cannot)."""
        request = instance_pb2.PauseInstanceRequest(instance_id=self.id)
        return self._update(self._t.unary(self._t.instances.PauseInstance, request).instance)

    def resume(self) -> Instance:
        """Thaw a paused instance."""
        request = instance_pb2.ResumeInstanceRequest(instance_id=self.id)
        return self._update(self._t.unary(self._t.instances.ResumeInstance, request).instance)

    def snapshot(self, name: str = "") -> Snapshot:
        """Save the instance's files as a snapshot; `create(snapshot_id=...)` restores it."""
        request = instance_pb2.CreateSnapshotRequest(instance_id=self.id, display_name=name)
        return Snapshot.from_proto(self._t.unary(self._t.instances.CreateSnapshot, request, timeout=600).snapshot)

    def delete(self) -> None:
        """Terminate the instance (deleting a terminated instance succeeds)."""
        request = instance_pb2.DeleteInstanceRequest(instance_id=self.id)
        self._update(self._t.unary(self._t.instances.DeleteInstance, request).instance)

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    # --- processes ---

    def exec_stream(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
        tag: str | None = None,
    ) -> Iterator[ExecEvent]:
        """Run a command and yield its events as they happen: Started, Stdout/Stderr..., Exited.

        A string is a shell command line (run by `bash -lc`), a sequence is an argv. `timeout`
        kills the command's whole process group. Leaving the iterator early kills the command.
        """
        request = start_request(self.id, command, env=env, cwd=cwd, stdin=stdin, timeout=timeout, tag=tag)
        call = self._t.stream(self._t.process.StartProcess, request)
        try:
            yield from _events(call)
        finally:
            call.cancel()

    def exec(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Run a command to its end and return its exit code and output.

        `on_stdout` / `on_stderr` see the output as it arrives. A non-zero exit code is a result,
        not an exception; check `result.exit_code` (or `result.ok`).
        """
        collector = ResultCollector()
        for event in self.exec_stream(command, env=env, cwd=cwd, stdin=stdin, timeout=timeout):
            collector.add(event)
            if on_stdout is not None and isinstance(event, Stdout):
                on_stdout(event.data)
            elif on_stderr is not None and isinstance(event, Stderr):
                on_stderr(event.data)
        return collector.result()

    def start(
        self,
        command: Command,
        *,
        tag: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        keep_stdin_open: bool = False,
        timeout: float | None = None,
    ) -> Process:
        """Start a command in the background and return at once; reattach later with `connect`."""
        request = start_request(
            self.id,
            command,
            env=env,
            cwd=cwd,
            stdin=stdin,
            keep_stdin_open=keep_stdin_open,
            timeout=timeout,
            tag=tag,
            background=True,
        )
        call = self._t.stream(self._t.process.StartProcess, request)
        try:
            for event in _events(call):
                if isinstance(event, Started):
                    return Process(self._t, self.id, event.pid, event.tag)
                if isinstance(event, Exited):
                    break
        finally:
            # Background: cancelling this stream leaves the process running.
            call.cancel()
        from cyberdesk._errors import CyberdeskError

        raise CyberdeskError(f"the process ended before it was reported as started ({command!r})")

    def connect(self, *, pid: int | None = None, tag: str | None = None) -> Process:
        """A handle on a running (or recently exited) process, by pid or tag."""
        selector(pid, tag)  # validates: exactly one
        return Process(self._t, self.id, pid or 0, tag or "")

    def processes(self) -> list[ProcessInfo]:
        """Running processes and those that exited in the last minute."""
        request = process_pb2.ListProcessesRequest(instance_id=self.id)
        return [ProcessInfo.from_proto(p) for p in self._t.unary(self._t.process.ListProcesses, request).processes]

    def shell(
        self,
        *,
        cols: int = 80,
        rows: int = 24,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> Shell:
        """Open an interactive terminal (the login shell unless argv is given)."""
        return Shell(self._t, pty_open(self.id, argv=argv, env=env, cwd=cwd, cols=cols, rows=rows))
