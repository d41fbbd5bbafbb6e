"""Interactive terminals (ProcessService.ConnectPty): open or attach, keystrokes, resize, signals.

Several clients may attach to one terminal (by pid or tag). Each has its own queue fed by the
terminal's single reader, and the terminal's output goes at the pace of the slowest client that is
still reading: the agent stops reading the terminal while such a client is more than a window
behind, so the program blocks on write and nothing is lost (`_fanout.pace_terminal`). A client
that stopped reading is detached alone, with RESOURCE_EXHAUSTED saying why, once it read nothing
for CYBERDESK_AGENT_PTY_STALL_SECONDS (30 s) or fell CYBERDESK_AGENT_PTY_BEHIND_BYTES (16 MiB)
behind while another client kept reading; it may attach again (the attach replays the recent
output). When nobody reads, the terminal waits: a slow client never hangs a terminal up. When the
last client leaves a terminal that was not opened in the background, the session is hung up
(SIGHUP, SIGKILL after a grace period), the way closing a terminal window does. A client leaves
with `detach`, which ends its stream with OK after every message sent before it was applied; a
cancelled call may lose keystrokes still in flight (gRPC drops a cancelled stream's unread messages).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from cyberdesk_common.status import RpcError, failed_precondition, invalid_argument
from cyberdesk_proto.v1 import process_pb2
from guest_agent._fanout import Exited, Subscriber
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
from guest_agent.process_spawn import Spec, login_shell
from guest_agent.process_table import ManagedProcess, ProcessTable

_MAX_SIZE = 10_000


class _Detached(Exception):
    """The client sent `detach`: its stream ends with OK."""


def _size(size: process_pb2.PtySize, field: str) -> tuple[int, int]:
    cols, rows = size.cols or 80, size.rows or 24
    if cols > _MAX_SIZE or rows > _MAX_SIZE:
        raise invalid_argument(f"{field}: {cols}x{rows} is larger than {_MAX_SIZE}x{_MAX_SIZE}")
    return cols, rows


def _open(table: ProcessTable, identity: Identity, request: process_pb2.PtyOpen) -> ManagedProcess:
    env = process_env(identity, {"TERM": "xterm-256color", **request.env})
    argv = list(request.argv) or login_shell()
    if not argv[0] or any("\0" in a for a in argv):
        raise invalid_argument("open.argv: the program must be named and contain no NUL byte")
    spec = Spec(
        argv=argv,
        env=env,
        cwd=resolve_cwd(request.cwd, env),
        tag=request.tag,
        background=request.background,
        pty_size=_size(request.size, "open.size"),
    )
    return table.spawn_pty(spec)


async def _pump_input(proc: ManagedProcess, requests: AsyncIterator[process_pb2.ConnectPtyRequest]) -> bool:
    """Apply the client's messages in order; True once it detached, False when it half-closed."""
    async for message in requests:
        which = message.WhichOneof("event")
        if which == "input":
            # Keys typed after the program let go of its terminal are dropped, as a closed
            # terminal window drops them, instead of failing the stream before the exit arrives.
            if proc.stdin_open:
                with contextlib.suppress(RpcError):
                    await proc.write(message.input)
        elif which == "resize":
            if proc.exited is None:
                proc.resize(*_size(message.resize, "resize"))
        elif which == "signal":
            sig = check_signal(message.signal)
            if proc.exited is None:
                proc.send_signal(sig, foreground=True)
        elif which == "detach":
            return True
        elif which in ("open", "attach"):
            raise invalid_argument(f"{which} is only allowed in the first message of the stream")
    return False


async def connect(
    table: ProcessTable, identity: Identity, requests: AsyncIterator[process_pb2.ConnectPtyRequest]
) -> AsyncIterator[process_pb2.ConnectPtyResponse]:
    """The ConnectPty stream: see the module docstring."""
    try:
        first = await anext(aiter(requests))
    except StopAsyncIteration:
        raise invalid_argument("the stream was empty: the first message must be open or attach") from None
    identity.check(first.instance_id)
    which = first.WhichOneof("event")
    if which == "open":
        proc = _open(table, identity, first.open)
        sub = proc.subscribe(replay=False)
    elif which == "attach":
        proc = select(table, first.attach.selector)
        if not proc.pty:
            raise failed_precondition(f"process {proc.pid} has no terminal; use ConnectProcess")
        sub = proc.subscribe(replay=True)
    else:
        raise invalid_argument("the first message must be open or attach")

    pump = asyncio.create_task(_pump_input(proc, requests))
    pump.add_done_callback(lambda task: _pump_done(task, sub))
    try:
        yield process_pb2.ConnectPtyResponse(started=started_pb(proc))
        async for event in follow(sub, table.limits.keepalive_seconds):
            if event is None:
                yield process_pb2.ConnectPtyResponse(keepalive=process_pb2.Keepalive())
            elif isinstance(event, Exited):
                yield process_pb2.ConnectPtyResponse(exited=exited_pb(event))
            else:
                yield process_pb2.ConnectPtyResponse(output=event.data)
    except _Detached:
        return
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump
        proc.unsubscribe(sub)
        if not proc.spec.background and not proc.subscribers:
            proc.kill_group("its last client disconnected")


def _pump_done(task: asyncio.Task[bool], sub: Subscriber) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is None and task.result():
        sub.interrupt(_Detached())
    elif isinstance(error, RpcError):
        sub.interrupt(error)
    elif error is not None:
        sub.interrupt(RpcError(invalid_argument("bad input").code, f"input failed: {error}"))
