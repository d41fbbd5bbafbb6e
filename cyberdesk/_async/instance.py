"""`AsyncInstance`: one isolated machine and everything a caller does with it."""

# `timeout` arguments are a command's lifetime in the API, not a deadline of the call itself.
# ruff: noqa: ASYNC109
from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from cyberdesk._async._transport import AsyncTransport
from cyberdesk._async.desktop import AsyncDesktop
from cyberdesk._async.files import AsyncFiles
from cyberdesk._async.ports import AsyncPorts
from cyberdesk._async.process import AsyncProcess, process_events
from cyberdesk._async.shell import AsyncShell
from cyberdesk._errors import CyberdeskError
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
    result_from_run,
)
from cyberdesk._requests import Command, duration, pty_open, run_request, selector, start_request
from cyberdesk_proto.v1 import instance_pb2, process_pb2

OutputCallback = Callable[[bytes], None]


class AsyncInstance:
    """An isolated machine. Used as a context manager, it is deleted when the block ends.

    Attributes mirror the API's Instance as last read (`refresh()` reads it again).
    """

    def __init__(self, transport: AsyncTransport, data: InstanceData) -> None:
        self._t = transport
        self.data = data
        self.files = AsyncFiles(transport, data.id)
        self.desktop = AsyncDesktop(transport, data.id)
        self.ports = AsyncPorts(transport, data.id)

    @property
    def id(self) -> str:
        """The instance id, e.g. "i-7f3a9c2e1b4d"."""
        return self.data.id

    @property
    def state(self) -> str:
        """The state as last read: PENDING, STARTING, RUNNING, PAUSED, STOPPING, TERMINATED, FAILED.

        UNKNOWN for a handle made from an id (`client.instances.handle`) until a call reads it.
        """
        return self.data.state

    def __repr__(self) -> str:
        return f"AsyncInstance(id={self.id!r}, state={self.state!r}, template={self.data.template!r})"

    def _update(self, proto: instance_pb2.Instance) -> AsyncInstance:
        self.data = InstanceData.from_proto(proto)
        return self

    # --- lifecycle ---

    async def refresh(self) -> AsyncInstance:
        """Read the instance again."""
        request = instance_pb2.GetInstanceRequest(instance_id=self.id)
        reply = await self._t.unary(self._t.instances.GetInstance, request)
        return self._update(reply.instance)

    async def set_timeout(self, seconds: float) -> AsyncInstance:
        """Move the deadline to now + seconds."""
        request = instance_pb2.SetInstanceTimeoutRequest(instance_id=self.id, timeout=duration(seconds, "timeout"))
        reply = await self._t.unary(self._t.instances.SetInstanceTimeout, request)
        return self._update(reply.instance)

    async def pause(self) -> AsyncInstance:
        """Freeze every process (FailedPrecondition where the runtime cannot)."""
        request = instance_pb2.PauseInstanceRequest(instance_id=self.id)
        reply = await self._t.unary(self._t.instances.PauseInstance, request)
        return self._update(reply.instance)

    async def resume(self) -> AsyncInstance:
        """Thaw a paused instance."""
        request = instance_pb2.ResumeInstanceRequest(instance_id=self.id)
        reply = await self._t.unary(self._t.instances.ResumeInstance, request)
        return self._update(reply.instance)

    async def snapshot(self, name: str = "") -> Snapshot:
        """Save the instance's files as a snapshot; `create(snapshot_id=...)` restores it."""
        request = instance_pb2.CreateSnapshotRequest(instance_id=self.id, display_name=name)
        reply = await self._t.unary(self._t.instances.CreateSnapshot, request, timeout=600)
        return Snapshot.from_proto(reply.snapshot)

    async def delete(self) -> None:
        """Terminate the instance (deleting a terminated instance succeeds)."""
        request = instance_pb2.DeleteInstanceRequest(instance_id=self.id)
        reply = await self._t.unary(self._t.instances.DeleteInstance, request)
        self._update(reply.instance)

    async def __aenter__(self) -> AsyncInstance:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.delete()

    # --- processes ---

    async def exec_stream(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
        tag: str | None = None,
    ) -> AsyncIterator[ExecEvent]:
        """Run a command and yield its events as they happen: Started, Stdout/Stderr..., Exited.

        A string is a shell command line (run by `bash -lc`), a sequence is an argv. `timeout`
        kills the command's whole process group. Leaving the iteration early kills the command.
        Nothing of the output is dropped, however much there is (the agent paces the command to
        the reader).
        """
        request = start_request(self.id, command, env=env, cwd=cwd, stdin=stdin, timeout=timeout, tag=tag)
        stream = self._t.stream(self._t.process.StartProcess, request)
        try:
            async for event in process_events(stream):
                yield event
        finally:
            stream.cancel()

    async def exec(
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

        A non-zero exit code is a result, not an exception; check `result.exit_code` (or
        `result.ok`). The call has no deadline: `timeout` kills the command after that long, and
        cancelling the call (Ctrl-C, a cancelled task) kills it at once.

        Without callbacks this is one RunProcess call (one request, one reply). Its output cap is
        15 MiB of stdout and stderr together: the agent keeps the first 15 MiB, reads and drops
        the rest (the command is never slowed or stopped by it) and the result has
        `truncated=True`. For more output pass `on_stdout` / `on_stderr`, which see the output as
        it arrives over the streaming path and drop nothing, or iterate `exec_stream()`.
        """
        if on_stdout is None and on_stderr is None:
            request = run_request(self.id, command, env=env, cwd=cwd, stdin=stdin, timeout=timeout)
            reply = await self._t.unary(self._t.process.RunProcess, request, deadline=False)
            return result_from_run(reply)
        collector = ResultCollector()
        async for event in self.exec_stream(command, env=env, cwd=cwd, stdin=stdin, timeout=timeout):
            collector.add(event)
            if on_stdout is not None and isinstance(event, Stdout):
                on_stdout(event.data)
            elif on_stderr is not None and isinstance(event, Stderr):
                on_stderr(event.data)
        return collector.result()

    async def start(
        self,
        command: Command,
        *,
        tag: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        keep_stdin_open: bool = False,
        timeout: float | None = None,
    ) -> AsyncProcess:
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
        stream = self._t.stream(self._t.process.StartProcess, request)
        try:
            async for event in process_events(stream):
                if isinstance(event, Started):
                    return AsyncProcess(self._t, self.id, event.pid, event.tag)
                if isinstance(event, Exited):
                    break
        finally:
            # Background: cancelling this stream leaves the process running.
            stream.cancel()
        raise CyberdeskError(f"the process ended before it was reported as started ({command!r})")

    def connect(self, *, pid: int | None = None, tag: str | None = None) -> AsyncProcess:
        """A handle on a running (or recently exited) process, by pid or tag."""
        selector(pid, tag)  # validates: exactly one
        return AsyncProcess(self._t, self.id, pid or 0, tag or "")

    async def processes(self) -> list[ProcessInfo]:
        """Running processes and those that exited in the last minute."""
        request = process_pb2.ListProcessesRequest(instance_id=self.id)
        reply = await self._t.unary(self._t.process.ListProcesses, request)
        return [ProcessInfo.from_proto(p) for p in reply.processes]

    async def shell(
        self,
        *,
        cols: int = 80,
        rows: int = 24,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> AsyncShell:
        """Open an interactive terminal (the login shell unless argv is given)."""
        shell = AsyncShell(self._t, pty_open(self.id, argv=argv, env=env, cwd=cwd, cols=cols, rows=rows))
        return await shell._open()
