"""ProcessService: streamed exec, run-to-completion exec, background processes with reattach,
stdin, signals, list, PTYs.

The work is done by `process_table` (lifecycle, lookup), `process_spawn`, `_fanout` and `_reaper`;
this module turns requests into specs and events into messages (with `process_messages`).
Terminals (ConnectPty) live in `pty.py`.

Back-pressure (see `_fanout` for the mechanics)
-----------------------------------------------
* A foreground StartProcess stream is the pacer of its process: when the client reads slowly,
  the agent stops reading the process's pipes, so the process blocks on write. Nothing is lost
  and the agent's memory stays flat whatever the volume (100 MB streams through a few MiB).
* The clients of a terminal pace it together, at the speed of the slowest one still reading;
  one that stopped reading is detached alone (see `pty`).
* Every other stream (a background StartProcess, each ConnectProcess) is lossy-but-honest: it
  can lag by up to CYBERDESK_AGENT_SUBSCRIBER_BYTES; beyond that it ends with
  RESOURCE_EXHAUSTED while the process and the other streams carry on unaffected. The client
  reconnects and replays the ring buffer (CYBERDESK_AGENT_RING_BYTES, 1 MiB by default).
* RunProcess keeps the output in memory up to its cap (max_output_bytes, at most 15 MiB) and
  drops the rest, so it never slows the process down and its memory is bounded by the cap.

Why RunProcess exists next to StartProcess: one reply instead of three stream messages (started,
output, exited) saves about 0.5 ms of a short exec (measured: `sh -c 'echo hi'` p50 1.6-1.9 ms
against 2.1-2.7 ms streamed, bench/agent_exec.py), and REST callers get one JSON object.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from cyberdesk_common.status import failed_precondition, invalid_argument
from cyberdesk_proto.v1 import process_pb2, process_pb2_grpc
from guest_agent import pty, worker_threads
from guest_agent._fanout import STDOUT, Chunk, Exited
from guest_agent.identity import Identity
from guest_agent.process_messages import (
    check_signal,
    exited_pb,
    follow,
    process_env,
    resolve_cwd,
    select,
    started_pb,
)
from guest_agent.process_spawn import Spec
from guest_agent.process_table import Limits, ProcessTable

Context = grpc.aio.ServicerContext[object, object]

PROCESS_SERVICE = process_pb2.DESCRIPTOR.services_by_name["ProcessService"].full_name

# RunProcess keeps at most this much output: the reply must fit the 16 MiB message limit of the
# agent and the gateway, with room for the rest of the message.
MAX_RUN_OUTPUT_BYTES = 15 * 1024 * 1024


def _event(event: Chunk | Exited | None) -> process_pb2.ProcessEvent:
    if event is None:
        return process_pb2.ProcessEvent(keepalive=process_pb2.Keepalive())
    if isinstance(event, Exited):
        return process_pb2.ProcessEvent(exited=exited_pb(event))
    if event.fd == STDOUT:
        return process_pb2.ProcessEvent(stdout=event.data)
    return process_pb2.ProcessEvent(stderr=event.data)


class ProcessServicer(process_pb2_grpc.ProcessServiceServicer):
    """Serves cyberdesk.v1.ProcessService inside the instance."""

    def __init__(self, identity: Identity, limits: Limits | None = None) -> None:
        self._identity = identity
        self._limits = limits or Limits.from_env()
        self._table_instance: ProcessTable | None = None

    @property
    def _table(self) -> ProcessTable:
        # Built on first use so that it binds to the server's running event loop.
        if self._table_instance is None:
            self._table_instance = ProcessTable(self._limits)
        return self._table_instance

    def register(self, server: grpc.aio.Server) -> None:
        """Serve on `server` and start reaping at once (orphans may appear before any request).

        Call it from the server's running event loop. It also installs the agent's worker threads
        (`worker_threads`), started now while the instance's pids are free, so that a fork bomb in a
        command cannot make a file call fail with INTERNAL.
        """
        worker_threads.install(asyncio.get_running_loop())
        _ = self._table
        process_pb2_grpc.add_ProcessServiceServicer_to_server(self, server)

    def _spec(
        self,
        request: process_pb2.StartProcessRequest | process_pb2.RunProcessRequest,
        *,
        tag: str = "",
        background: bool = False,
        keep_stdin_open: bool = False,
    ) -> Spec:
        if request.argv and request.command:
            raise invalid_argument("give either argv or command, not both")
        if request.command:
            argv = ["bash", "-lc", request.command]
        elif request.argv:
            if not request.argv[0]:
                raise invalid_argument("argv[0] is empty: name the program to run")
            argv = list(request.argv)
        else:
            raise invalid_argument("give argv (a program and its arguments) or command (a shell command line)")
        if any("\0" in a for a in argv):
            raise invalid_argument("argv and command must not contain NUL bytes")
        timeout: float | None = None
        if request.HasField("timeout"):
            timeout = request.timeout.ToNanoseconds() / 1e9
            if timeout <= 0:
                raise invalid_argument("timeout must be positive (leave it unset for no limit)")
        env = process_env(self._identity, request.env)
        return Spec(
            argv=argv,
            env=env,
            cwd=resolve_cwd(request.cwd, env),
            tag=tag,
            background=background,
            stdin=request.stdin,
            keep_stdin_open=keep_stdin_open,
            timeout=timeout,
        )

    async def StartProcess(
        self, request: process_pb2.StartProcessRequest, context: Context
    ) -> AsyncIterator[process_pb2.StartProcessResponse]:
        """Run a command; stream started, output chunks, keepalives and the exit."""
        self._identity.check(request.instance_id)
        spec = self._spec(
            request, tag=request.tag, background=request.background, keep_stdin_open=request.keep_stdin_open
        )
        proc = self._table.spawn(spec)
        if isinstance(proc, Exited):  # never started: no pid to report, only why
            yield process_pb2.StartProcessResponse(event=_event(proc))
            return
        sub = proc.subscribe(replay=False, pacer=not spec.background)
        try:
            yield process_pb2.StartProcessResponse(event=process_pb2.ProcessEvent(started=started_pb(proc)))
            async for event in follow(sub, self._limits.keepalive_seconds):
                yield process_pb2.StartProcessResponse(event=_event(event))
        finally:
            proc.unsubscribe(sub)
            if not spec.background:
                proc.kill_group("the stream that started it ended before the process did")

    async def RunProcess(
        self, request: process_pb2.RunProcessRequest, context: Context
    ) -> process_pb2.RunProcessResponse:
        """Run a command to completion; reply once with its exit and output (capped, see `truncated`)."""
        self._identity.check(request.instance_id)
        cap = request.max_output_bytes or MAX_RUN_OUTPUT_BYTES
        if cap > MAX_RUN_OUTPUT_BYTES:
            raise invalid_argument(
                f"max_output_bytes: at most {MAX_RUN_OUTPUT_BYTES} (15 MiB) so the reply fits one message; "
                "use StartProcess to stream more output"
            )
        spec = self._spec(request)
        proc = self._table.spawn(spec)
        if isinstance(proc, Exited):  # never started: no pid, only why
            return process_pb2.RunProcessResponse(exited=exited_pb(proc))
        collector = proc.collect(cap)
        try:
            exited = await collector.finished
        finally:
            proc.unsubscribe(collector)
            proc.kill_group("the call that started it ended before the process did")
        return process_pb2.RunProcessResponse(
            pid=proc.pid,
            exited=exited_pb(exited),
            stdout=bytes(collector.stdout),
            stderr=bytes(collector.stderr),
            truncated=collector.truncated,
        )

    async def ConnectProcess(
        self, request: process_pb2.ConnectProcessRequest, context: Context
    ) -> AsyncIterator[process_pb2.ConnectProcessResponse]:
        """Reattach: started, the buffered output (unless skip_replay), then live output and the exit."""
        self._identity.check(request.instance_id)
        proc = select(self._table, request.selector)
        sub = proc.subscribe(replay=not request.skip_replay)
        try:
            yield process_pb2.ConnectProcessResponse(event=process_pb2.ProcessEvent(started=started_pb(proc)))
            async for event in follow(sub, self._limits.keepalive_seconds):
                yield process_pb2.ConnectProcessResponse(event=_event(event))
        finally:
            proc.unsubscribe(sub)

    async def ListProcesses(
        self, request: process_pb2.ListProcessesRequest, context: Context
    ) -> process_pb2.ListProcessesResponse:
        """Running processes and terminals, and those that exited within the retention time."""
        self._identity.check(request.instance_id)
        reply = process_pb2.ListProcessesResponse()
        for proc in self._table.all():
            info = reply.processes.add(
                pid=proc.pid,
                tag=proc.spec.tag,
                argv=list(proc.spec.argv),
                cwd=proc.spec.cwd,
                pty=proc.pty,
                background=proc.spec.background,
            )
            info.start_time.FromNanoseconds(int(proc.start_time * 1e9))
            if proc.exited is not None:
                info.exited.CopyFrom(exited_pb(proc.exited))
        return reply

    async def SendProcessInput(
        self, request: process_pb2.SendProcessInputRequest, context: Context
    ) -> process_pb2.SendProcessInputResponse:
        """Write bytes to stdin (after any earlier writes); returns once they are written."""
        self._identity.check(request.instance_id)
        await select(self._table, request.selector).write(request.data)
        return process_pb2.SendProcessInputResponse()

    async def StreamProcessInput(
        self, request_iterator: AsyncIterator[process_pb2.StreamProcessInputRequest], context: Context
    ) -> process_pb2.StreamProcessInputResponse:
        """Write a stream of chunks to stdin, in order; the end of the stream leaves stdin open."""
        first = True
        written = 0
        proc = None
        async for message in request_iterator:
            if first:
                self._identity.check(message.instance_id)
                proc = select(self._table, message.selector)
                first = False
            assert proc is not None
            if message.data:
                await proc.write(message.data)
                written += len(message.data)
        if first:
            raise invalid_argument("the stream was empty: its first message must name the instance and process")
        return process_pb2.StreamProcessInputResponse(bytes_written=written)

    async def CloseProcessStdin(
        self, request: process_pb2.CloseProcessStdinRequest, context: Context
    ) -> process_pb2.CloseProcessStdinResponse:
        """Close stdin after pending writes: the process reads end-of-file."""
        self._identity.check(request.instance_id)
        await select(self._table, request.selector).close_stdin()
        return process_pb2.CloseProcessStdinResponse()

    async def SendProcessSignal(
        self, request: process_pb2.SendProcessSignalRequest, context: Context
    ) -> process_pb2.SendProcessSignalResponse:
        """Send a signal to the process's whole group."""
        self._identity.check(request.instance_id)
        sig = check_signal(request.signal)
        proc = select(self._table, request.selector)
        if proc.exited is not None:
            raise failed_precondition(f"process {proc.pid} has already exited")
        proc.send_signal(sig)
        return process_pb2.SendProcessSignalResponse()

    async def ConnectPty(
        self, request_iterator: AsyncIterator[process_pb2.ConnectPtyRequest], context: Context
    ) -> AsyncIterator[process_pb2.ConnectPtyResponse]:
        """Open or attach to a terminal; keystrokes, resizes and signals in, output and exit out."""
        async for response in pty.connect(self._table, self._identity, request_iterator):
            yield response
