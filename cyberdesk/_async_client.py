"""`AsyncCyberdesk`: the asyncio client; the same surface as `Cyberdesk`, with `await`."""

# `timeout` arguments here are a command's or an instance's lifetime in the API, not a deadline of
# the coroutine itself, so asyncio.timeout() is no substitute:
# ruff: noqa: ASYNC109
from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from cyberdesk._client import started
from cyberdesk._config import resolve
from cyberdesk._desktop import screenshot_from_proto
from cyberdesk._errors import CyberdeskError, DataLoss, NotFound
from cyberdesk._files import Progress, Source, _size_of, header, open_source
from cyberdesk._models import (
    ExecEvent,
    ExecResult,
    Exited,
    FileInfo,
    FsEvent,
    InstanceData,
    ResultCollector,
    Screenshot,
    Snapshot,
    Started,
    Stderr,
    Stdout,
    UploadResult,
    event_from_proto,
    exited_from_proto,
)
from cyberdesk._requests import (
    CHUNK,
    Button,
    Command,
    Direction,
    button,
    create_request,
    direction,
    duration,
    point,
    pty_open,
    screenshot_request,
    selector,
    signal_number,
    start_request,
)
from cyberdesk._transport import AsyncTransport, aiterate
from cyberdesk_proto.v1 import desktop_pb2, filesystem_pb2, instance_pb2, process_pb2


async def _events(call: Any) -> AsyncIterator[ExecEvent]:
    async for reply in aiterate(call):
        event = event_from_proto(reply.event)
        if event is not None:
            yield event


class AsyncProcess:
    """A process running in an instance (see `Process`)."""

    def __init__(self, transport: AsyncTransport, instance_id: str, pid: int, tag: str = "") -> None:
        self._t = transport
        self.instance_id = instance_id
        self.pid = pid
        self.tag = tag

    def _selector(self) -> process_pb2.ProcessSelector:
        return selector(self.pid, None) if self.pid else selector(None, self.tag)

    async def events(self, *, skip_replay: bool = False) -> AsyncIterator[ExecEvent]:
        """Reattach: buffered output (unless skip_replay), then live events until exit."""
        request = process_pb2.ConnectProcessRequest(
            instance_id=self.instance_id, selector=self._selector(), skip_replay=skip_replay
        )
        call = self._t.stream(self._t.process.ConnectProcess, request)
        try:
            async for event in _events(call):
                yield event
        finally:
            call.cancel()

    async def wait(self) -> ExecResult:
        """Wait for the exit and collect the output."""
        collector = ResultCollector()
        async for event in self.events():
            collector.add(event)
        collector.pid = collector.pid or self.pid
        return collector.result()

    async def send_stdin(self, data: bytes | str) -> None:
        """Write to stdin."""
        payload = data.encode() if isinstance(data, str) else data
        request = process_pb2.SendProcessInputRequest(
            instance_id=self.instance_id, selector=self._selector(), data=payload
        )
        await self._t.unary(self._t.process.SendProcessInput, request)

    async def close_stdin(self) -> None:
        """Close stdin."""
        request = process_pb2.CloseProcessStdinRequest(instance_id=self.instance_id, selector=self._selector())
        await self._t.unary(self._t.process.CloseProcessStdin, request)

    async def signal(self, sig: int | str) -> None:
        """Signal the process group."""
        request = process_pb2.SendProcessSignalRequest(
            instance_id=self.instance_id,
            selector=self._selector(),
            signal=signal_number(sig),  # type: ignore[arg-type]
        )
        await self._t.unary(self._t.process.SendProcessSignal, request)

    async def kill(self) -> None:
        """SIGKILL the process group."""
        await self.signal("KILL")


class AsyncShell:
    """An interactive terminal (see `Shell`); `async for chunk in shell` reads output."""

    def __init__(self, transport: AsyncTransport, first: process_pb2.ConnectPtyRequest) -> None:
        self._t = transport
        self._call = transport.stream(transport.process.ConnectPty, None)
        self._first = first
        self.pid = 0
        self.exited: Exited | None = None

    async def _open(self) -> AsyncShell:
        try:
            await self._call.write(self._first)
            while True:
                reply = await self._call.read()
                if reply is None or reply.WhichOneof("event") == "started":
                    self.pid = reply.started.pid if reply is not None else 0
                    return self
                if reply.WhichOneof("event") == "exited":
                    self.exited = exited_from_proto(reply.exited)
                    return self
        except Exception as err:
            import grpc

            if isinstance(err, grpc.RpcError):
                from cyberdesk._errors import from_rpc_error

                raise from_rpc_error(err) from None
            raise

    async def send(self, data: bytes | str) -> None:
        """Send keystrokes."""
        await self._call.write(process_pb2.ConnectPtyRequest(input=data.encode() if isinstance(data, str) else data))

    async def resize(self, cols: int, rows: int) -> None:
        """Tell the terminal its new size."""
        await self._call.write(process_pb2.ConnectPtyRequest(resize=process_pb2.PtySize(cols=cols, rows=rows)))

    async def signal(self, sig: int | str) -> None:
        """Signal the foreground process group."""
        await self._call.write(process_pb2.ConnectPtyRequest(signal=signal_number(sig)))  # type: ignore[arg-type]

    async def recv(self, timeout: float | None = None) -> bytes:
        """The next output bytes; b"" once the terminal has ended."""
        import grpc

        from cyberdesk._errors import from_rpc_error

        if self.exited is not None:
            return b""
        try:
            while True:
                reply = await asyncio.wait_for(self._call.read(), timeout)
                if reply is grpc.aio.EOF or reply is None:  # type: ignore[attr-defined]
                    return b""
                kind = reply.WhichOneof("event")
                if kind == "output":
                    data: bytes = reply.output
                    return data
                if kind == "exited":
                    self.exited = exited_from_proto(reply.exited)
                    return b""
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        while chunk := await self.recv():
            yield chunk

    async def close(self) -> None:
        """Leave the terminal."""
        self._call.cancel()

    async def __aenter__(self) -> AsyncShell:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncFiles:
    """Files of one instance (see `Files`)."""

    def __init__(self, transport: AsyncTransport, instance_id: str) -> None:
        self._t = transport
        self._id = instance_id

    async def upload(
        self,
        source: Source,
        path: str,
        *,
        overwrite: bool = True,
        create_parents: bool = True,
        mode: int | None = None,
        progress: Progress | None = None,
    ) -> UploadResult:
        """Upload a local file, an open binary file or bytes to `path`; the sha256 is checked."""
        stream, owned = open_source(source)
        digest = hashlib.sha256()
        head = header(path, overwrite=overwrite, create_parents=create_parents, mode=mode)
        total = _size_of(stream)

        async def requests() -> AsyncIterator[filesystem_pb2.UploadFileRequest]:
            yield filesystem_pb2.UploadFileRequest(instance_id=self._id, header=head)
            done = 0
            # Reading a local file blocks briefly per chunk; it is done off the event loop.
            while chunk := await asyncio.to_thread(stream.read, CHUNK):
                digest.update(chunk)
                done += len(chunk)
                yield filesystem_pb2.UploadFileRequest(chunk=chunk)
                if progress is not None:
                    progress(done, total)

        try:
            reply = await self._t.unary(self._t.files.UploadFile, requests(), timeout=None)
        finally:
            if owned:
                stream.close()
        if reply.sha256 and reply.sha256 != digest.hexdigest():
            raise DataLoss(f"upload of {path}: the instance stored sha256 {reply.sha256}, sent {digest.hexdigest()}")
        return UploadResult(reply.path, reply.size, reply.sha256)

    async def write(self, path: str, data: bytes | str, *, mode: int | None = None) -> UploadResult:
        """Write bytes (or UTF-8 text) to `path`, replacing it."""
        return await self.upload(data.encode() if isinstance(data, str) else data, path, mode=mode)

    async def iter_download(self, path: str, *, offset: int = 0, length: int = 0) -> AsyncIterator[tuple[bytes, int]]:
        """Chunks of a file with its total size; the sha256 is checked at the end."""
        request = filesystem_pb2.DownloadFileRequest(instance_id=self._id, path=path, offset=offset, length=length)
        digest = hashlib.sha256()
        total = 0
        async for reply in aiterate(self._t.stream(self._t.files.DownloadFile, request)):
            total = reply.total_size or total
            if reply.chunk:
                digest.update(reply.chunk)
                yield reply.chunk, total
            if reply.sha256 and reply.sha256 != digest.hexdigest():
                raise DataLoss(
                    f"download of {path}: sha256 {digest.hexdigest()} differs from the instance's {reply.sha256}"
                )

    async def download(
        self, path: str, destination: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> int:
        """Download `path` into a local file (renamed into place when complete); returns the byte count."""
        target = Path(destination)
        partial = target.with_name(f".{target.name}.partial")
        done = 0
        try:
            out = await asyncio.to_thread(open, partial, "wb")
            try:
                async for chunk, total in self.iter_download(path):
                    await asyncio.to_thread(out.write, chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            finally:
                out.close()
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return done

    async def read(self, path: str) -> bytes:
        """The whole content of a file."""
        return b"".join([chunk async for chunk, _ in self.iter_download(path)])

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The content of a text file."""
        return (await self.read(path)).decode(encoding)

    async def list(self, path: str, *, depth: int = 1) -> list[FileInfo]:
        """Entries of a directory."""
        request = filesystem_pb2.ListDirectoryRequest(instance_id=self._id, path=path, depth=depth)
        return [FileInfo.from_proto(e) for e in (await self._t.unary(self._t.files.ListDirectory, request)).entries]

    async def stat(self, path: str) -> FileInfo:
        """Metadata of a path."""
        request = filesystem_pb2.StatPathRequest(instance_id=self._id, path=path)
        return FileInfo.from_proto((await self._t.unary(self._t.files.StatPath, request)).info)

    async def exists(self, path: str) -> bool:
        """Whether the path exists."""
        try:
            await self.stat(path)
        except NotFound:
            return False
        return True

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file or directory."""
        request = filesystem_pb2.RemovePathRequest(instance_id=self._id, path=path, recursive=recursive)
        await self._t.unary(self._t.files.RemovePath, request)

    async def make_dir(self, path: str, *, parents: bool = True, mode: int | None = None) -> FileInfo:
        """Make a directory."""
        request = filesystem_pb2.MakeDirectoryRequest(instance_id=self._id, path=path, parents=parents, mode=mode or 0)
        return FileInfo.from_proto((await self._t.unary(self._t.files.MakeDirectory, request)).info)

    async def move(self, source: str, destination: str, *, overwrite: bool = False) -> FileInfo:
        """Move or rename."""
        request = filesystem_pb2.MovePathRequest(
            instance_id=self._id, source=source, destination=destination, overwrite=overwrite
        )
        return FileInfo.from_proto((await self._t.unary(self._t.files.MovePath, request)).info)

    async def watch(self, path: str, *, recursive: bool = False) -> AsyncIterator[FsEvent]:
        """Changes below a directory, as they happen (break out of the loop to stop)."""
        request = filesystem_pb2.WatchDirectoryRequest(instance_id=self._id, path=path, recursive=recursive)
        call = self._t.stream(self._t.files.WatchDirectory, request)
        try:
            async for reply in aiterate(call):
                if reply.WhichOneof("event") == "change":
                    yield FsEvent.from_proto(reply.change)
        finally:
            call.cancel()


class AsyncDesktop:
    """The desktop of one instance (see `Desktop`)."""

    def __init__(self, transport: AsyncTransport, instance_id: str) -> None:
        self._t = transport
        self._id = instance_id

    async def screenshot(
        self,
        *,
        format: Literal["png", "jpeg"] = "png",
        quality: int = 0,
        region: tuple[int, int, int, int] | None = None,
        scale: float = 0.0,
    ) -> Screenshot:
        """Capture the screen."""
        request = screenshot_request(self._id, format=format, quality=quality, region=region, scale=scale)
        return screenshot_from_proto(await self._t.unary(self._t.desktop.TakeScreenshot, request))

    async def move(self, x: int, y: int) -> None:
        """Move the pointer."""
        request = desktop_pb2.MoveMouseRequest(instance_id=self._id, position=desktop_pb2.Point(x=x, y=y))
        await self._t.unary(self._t.desktop.MoveMouse, request)

    async def click(
        self, x: int | None = None, y: int | None = None, *, button: Button = "left", count: int = 1
    ) -> None:
        """Click, at (x, y) when given."""
        request = desktop_pb2.ClickMouseRequest(instance_id=self._id, button=_button(button), count=count)
        where = point(x, y)
        if where is not None:
            request.position.CopyFrom(where)
        await self._t.unary(self._t.desktop.ClickMouse, request)

    async def drag(self, start: tuple[int, int], end: tuple[int, int], *, button: Button = "left") -> None:
        """Drag from start to end."""
        request = desktop_pb2.DragMouseRequest(
            instance_id=self._id,
            start=desktop_pb2.Point(x=start[0], y=start[1]),
            end=desktop_pb2.Point(x=end[0], y=end[1]),
            button=_button(button),
        )
        await self._t.unary(self._t.desktop.DragMouse, request)

    async def scroll(
        self, direction: Direction = "down", amount: int = 1, *, x: int | None = None, y: int | None = None
    ) -> None:
        """Scroll."""
        request = desktop_pb2.ScrollRequest(instance_id=self._id, direction=_direction(direction), amount=amount)
        where = point(x, y)
        if where is not None:
            request.position.CopyFrom(where)
        await self._t.unary(self._t.desktop.Scroll, request)

    async def type(self, text: str, *, delay_ms: int = 0) -> None:
        """Type text."""
        await self._t.unary(
            self._t.desktop.TypeText, desktop_pb2.TypeTextRequest(instance_id=self._id, text=text, delay_ms=delay_ms)
        )

    async def press(self, *keys: str) -> None:
        """Press key combinations in order."""
        await self._t.unary(
            self._t.desktop.PressKeys, desktop_pb2.PressKeysRequest(instance_id=self._id, keys=list(keys))
        )

    async def cursor(self) -> tuple[int, int]:
        """The pointer position."""
        reply = await self._t.unary(
            self._t.desktop.GetCursorPosition, desktop_pb2.GetCursorPositionRequest(instance_id=self._id)
        )
        return reply.position.x, reply.position.y

    async def size(self) -> tuple[int, int]:
        """The screen size."""
        reply = await self._t.unary(
            self._t.desktop.GetDisplayInfo, desktop_pb2.GetDisplayInfoRequest(instance_id=self._id)
        )
        return reply.width, reply.height


_button = button
_direction = direction


class AsyncInstance:
    """An isolated machine (see `Instance`); `async with` deletes it when the block ends."""

    def __init__(self, transport: AsyncTransport, data: InstanceData) -> None:
        self._t = transport
        self.data = data
        self.files = AsyncFiles(transport, data.id)
        self.desktop = AsyncDesktop(transport, data.id)

    @property
    def id(self) -> str:
        """The instance id."""
        return self.data.id

    @property
    def state(self) -> str:
        """The state as last read."""
        return self.data.state

    def __repr__(self) -> str:
        return f"AsyncInstance(id={self.id!r}, state={self.state!r}, template={self.data.template!r})"

    def _update(self, proto: instance_pb2.Instance) -> AsyncInstance:
        self.data = InstanceData.from_proto(proto)
        return self

    async def refresh(self) -> AsyncInstance:
        """Read the instance again."""
        reply = await self._t.unary(self._t.instances.GetInstance, instance_pb2.GetInstanceRequest(instance_id=self.id))
        return self._update(reply.instance)

    async def set_timeout(self, seconds: float) -> AsyncInstance:
        """Move the deadline to now + seconds."""
        request = instance_pb2.SetInstanceTimeoutRequest(instance_id=self.id, timeout=duration(seconds, "timeout"))
        return self._update((await self._t.unary(self._t.instances.SetInstanceTimeout, request)).instance)

    async def pause(self) -> AsyncInstance:
        """Freeze every process."""
        request = instance_pb2.PauseInstanceRequest(instance_id=self.id)
        return self._update((await self._t.unary(self._t.instances.PauseInstance, request)).instance)

    async def resume(self) -> AsyncInstance:
        """Thaw a paused instance."""
        request = instance_pb2.ResumeInstanceRequest(instance_id=self.id)
        return self._update((await self._t.unary(self._t.instances.ResumeInstance, request)).instance)

    async def snapshot(self, name: str = "") -> Snapshot:
        """Save the instance's files as a snapshot."""
        request = instance_pb2.CreateSnapshotRequest(instance_id=self.id, display_name=name)
        return Snapshot.from_proto(
            (await self._t.unary(self._t.instances.CreateSnapshot, request, timeout=600)).snapshot
        )

    async def delete(self) -> None:
        """Terminate the instance."""
        request = instance_pb2.DeleteInstanceRequest(instance_id=self.id)
        self._update((await self._t.unary(self._t.instances.DeleteInstance, request)).instance)

    async def __aenter__(self) -> AsyncInstance:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.delete()

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
        """Run a command and yield its events as they happen (leaving early kills it)."""
        request = start_request(self.id, command, env=env, cwd=cwd, stdin=stdin, timeout=timeout, tag=tag)
        call = self._t.stream(self._t.process.StartProcess, request)
        try:
            async for event in _events(call):
                yield event
        finally:
            call.cancel()

    async def exec(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a command to its end; returns exit code, stdout and stderr."""
        collector = ResultCollector()
        async for event in self.exec_stream(command, env=env, cwd=cwd, stdin=stdin, timeout=timeout):
            collector.add(event)
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
        """Start a command in the background and return at once."""
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
            async for event in _events(call):
                if isinstance(event, Started):
                    return AsyncProcess(self._t, self.id, event.pid, event.tag)
                if isinstance(event, Exited):
                    break
        finally:
            call.cancel()
        raise CyberdeskError(f"the process ended before it was reported as started ({command!r})")

    def connect(self, *, pid: int | None = None, tag: str | None = None) -> AsyncProcess:
        """A handle on a process by pid or tag."""
        selector(pid, tag)
        return AsyncProcess(self._t, self.id, pid or 0, tag or "")

    async def shell(
        self,
        *,
        cols: int = 80,
        rows: int = 24,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> AsyncShell:
        """Open an interactive terminal."""
        return await AsyncShell(self._t, pty_open(self.id, argv=argv, env=env, cwd=cwd, cols=cols, rows=rows))._open()


class AsyncInstances:
    """`client.instances` of the async client."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def create(
        self,
        template: str = "base",
        *,
        timeout: float | None = None,
        desktop: bool = False,
        width: int = 0,
        height: int = 0,
        vcpus: int = 0,
        memory_mib: int = 0,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        internet: bool = False,
        snapshot_id: str | None = None,
        request_id: str | None = None,
        pause_on_timeout: bool = False,
    ) -> AsyncInstance:
        """Create an instance and return it once RUNNING (see `Instances.create`)."""
        request = create_request(
            template,
            timeout=timeout,
            desktop=desktop,
            width=width,
            height=height,
            vcpus=vcpus,
            memory_mib=memory_mib,
            env=env,
            labels=labels,
            internet=internet,
            snapshot_id=snapshot_id,
            request_id=request_id,
            pause_on_timeout=pause_on_timeout,
        )
        reply = await self._t.unary(self._t.instances.CreateInstance, request, timeout=max(self._t.timeout, 120))
        return AsyncInstance(self._t, started(InstanceData.from_proto(reply.instance)))

    async def get(self, instance_id: str) -> AsyncInstance:
        """One instance by id."""
        reply = await self._t.unary(
            self._t.instances.GetInstance, instance_pb2.GetInstanceRequest(instance_id=instance_id)
        )
        return AsyncInstance(self._t, InstanceData.from_proto(reply.instance))

    async def list(
        self, *, states: list[str] | None = None, labels: Mapping[str, str] | None = None
    ) -> list[AsyncInstance]:
        """The caller's instances, newest first."""
        from cyberdesk._client import state_filter

        result: list[AsyncInstance] = []
        token = ""
        while True:
            request = instance_pb2.ListInstancesRequest(
                page_size=200,
                page_token=token,
                states=state_filter(states),
                labels=dict(labels or {}),
            )
            reply = await self._t.unary(self._t.instances.ListInstances, request)
            result.extend(AsyncInstance(self._t, InstanceData.from_proto(i)) for i in reply.instances)
            token = reply.next_page_token
            if not token:
                return result

    async def delete(self, instance_id: str) -> None:
        """Terminate an instance."""
        await self._t.unary(
            self._t.instances.DeleteInstance, instance_pb2.DeleteInstanceRequest(instance_id=instance_id)
        )


class AsyncCyberdesk:
    """The asyncio Cyberdesk client; settings resolve as for `Cyberdesk`. Use it in `async with`."""

    def __init__(self, api_key: str | None = None, endpoint: str | None = None, *, timeout: float = 60.0) -> None:
        self._t = AsyncTransport(resolve(api_key, endpoint), timeout)
        self.endpoint = self._t.config.endpoint
        self.instances = AsyncInstances(self._t)

    async def close(self) -> None:
        """Close the connection."""
        await self._t.close()

    async def __aenter__(self) -> AsyncCyberdesk:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncCyberdesk", "AsyncFiles", "AsyncInstance", "AsyncProcess", "AsyncShell", "Stderr", "Stdout"]
