"""Between ProcessService's messages and the process table: request checks, events as messages.

Shared by the process handlers (`process`) and the terminal handler (`pty`): the working
directory and environment of a request, signal numbers, which process a selector names, the wire
form of a start and an exit, and a subscription read as events with keepalives.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from google.protobuf import timestamp_pb2

from cyberdesk_common.status import invalid_argument, not_found, resource_exhausted
from cyberdesk_proto.v1 import process_pb2
from guest_agent._fanout import Chunk, Exited, Overflow, Subscriber
from guest_agent.identity import Identity
from guest_agent.process_table import ManagedProcess, ProcessTable

_SIGNALS = {v for v in process_pb2.Signal.values() if v != process_pb2.SIGNAL_UNSPECIFIED}


def home_dir(env: Mapping[str, str]) -> str:
    """The agent's home directory (the default working directory), or / when there is none."""
    home = env.get("HOME") or os.path.expanduser("~")
    return home if os.path.isdir(home) else "/"


def resolve_cwd(cwd: str, env: Mapping[str, str]) -> str:
    """`cwd` made absolute (relative paths are taken from the home directory); it must be a directory."""
    home = home_dir(env)
    if not cwd:
        return home
    path = Path(home, cwd)  # an absolute cwd replaces home
    if not path.exists():
        raise not_found(f"cwd: the working directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise invalid_argument(f"cwd: {str(path)!r} is not a directory")
    return str(path)


def process_env(identity: Identity, extra: Mapping[str, str]) -> dict[str, str]:
    """The instance's environment (as a warm-pool claim set it) with the request's variables on top."""
    for name in extra:
        if not name or "=" in name or "\0" in name:
            raise invalid_argument(f"env: {name!r} is not a valid variable name")
    for name, value in extra.items():
        if "\0" in value:
            raise invalid_argument(f"env: the value of {name} contains a NUL byte")
    return {**identity.env, **extra}


def check_signal(value: int) -> int:
    """A validated signal number from the Signal enum."""
    if value not in _SIGNALS:
        raise invalid_argument("signal: give one of the Signal values (SIGNAL_SIGINT, SIGNAL_SIGTERM, ...)")
    return value


def select(table: ProcessTable, selector: process_pb2.ProcessSelector) -> ManagedProcess:
    """The process named by `selector`."""
    which = selector.WhichOneof("selector")
    if which is None:
        raise invalid_argument("selector: give a pid or a tag")
    if which == "tag" and not selector.tag:
        raise invalid_argument("selector.tag is empty")
    if which == "pid" and not selector.pid:
        raise invalid_argument("selector.pid is 0")
    return table.find(selector.pid, selector.tag)


def exited_pb(exited: Exited) -> process_pb2.ProcessExited:
    """The wire form of an exit."""
    end = timestamp_pb2.Timestamp()
    end.FromNanoseconds(int(exited.end_time * 1e9))
    return process_pb2.ProcessExited(
        exit_code=exited.exit_code,
        signal=exited.signal,
        timed_out=exited.timed_out,
        error=exited.error,
        end_time=end,
        out_of_memory=exited.out_of_memory,
    )


def started_pb(proc: ManagedProcess) -> process_pb2.ProcessStarted:
    """The wire form of a start."""
    return process_pb2.ProcessStarted(pid=proc.pid, tag=proc.spec.tag)


async def follow(sub: Subscriber, keepalive_seconds: float) -> AsyncIterator[Chunk | Exited | None]:
    """A subscriber's events, with None whenever a keepalive is due; ends after the exit event.

    A subscriber that fell behind ends with RESOURCE_EXHAUSTED, which tells the client how to
    recover.
    """
    while True:
        try:
            event = await sub.get(keepalive_seconds)
        except Overflow:
            raise resource_exhausted(
                f"this stream fell more than {sub.limit} bytes behind the process output and was cut off; "
                "reconnect (ConnectProcess or a PTY attach) to replay the recent output"
            ) from None
        yield event
        if isinstance(event, Exited):
            return
