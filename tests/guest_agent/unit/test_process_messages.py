"""Request checks and event messages of ProcessService, and the spawn outcome of a program that
cannot start: called in-process, without starting anything.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from cyberdesk_common.status import RpcError
from cyberdesk_proto.v1 import process_pb2
from guest_agent._fanout import STDOUT, Chunk, Exited, Subscriber
from guest_agent.identity import Identity
from guest_agent.process_messages import check_signal, exited_pb, follow, process_env, resolve_cwd, select
from guest_agent.process_spawn import not_started


def test_cwd_is_taken_from_home_unless_absolute(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "file").write_bytes(b"")
    env = {"HOME": str(tmp_path)}
    assert resolve_cwd("", env) == str(tmp_path)
    assert resolve_cwd("work", env) == str(tmp_path / "work")
    assert resolve_cwd("/", env) == "/"
    with pytest.raises(RpcError) as err:
        resolve_cwd("missing", env)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(RpcError) as err:
        resolve_cwd("file", env)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # A home that does not exist falls back to /.
    assert resolve_cwd("", {"HOME": str(tmp_path / "no-such-home")}) == "/"


def test_request_variables_go_on_top_of_the_instance_environment() -> None:
    identity = Identity("i-1", base_env={"PATH": "/usr/bin", "KEEP": "1"})
    identity.bind("i-1", {"CLAIMED": "yes"})
    assert process_env(identity, {"PATH": "/opt/bin"}) == {"PATH": "/opt/bin", "KEEP": "1", "CLAIMED": "yes"}
    for bad in ({"": "x"}, {"A=B": "x"}, {"NUL\0": "x"}, {"OK": "nul\0value"}):
        with pytest.raises(RpcError) as err:
            process_env(identity, bad)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, bad


def test_only_signal_enum_values_are_accepted() -> None:
    assert check_signal(process_pb2.SIGNAL_SIGTERM) == process_pb2.SIGNAL_SIGTERM
    for bad in (process_pb2.SIGNAL_UNSPECIFIED, 999):
        with pytest.raises(RpcError) as err:
            check_signal(bad)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


class _RecordingTable:
    """Stands in for ProcessTable.find only: `select` checks the selector, the table looks it up."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, str]] = []
        self.found = object()

    def find(self, pid: int, tag: str) -> object:
        self.asked.append((pid, tag))
        return self.found


def test_select_checks_the_selector_before_the_lookup() -> None:
    table = _RecordingTable()
    empty = (process_pb2.ProcessSelector(), process_pb2.ProcessSelector(tag=""), process_pb2.ProcessSelector(pid=0))
    for selector in empty:
        with pytest.raises(RpcError) as err:
            select(table, selector)  # type: ignore[arg-type]
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert table.asked == []
    assert select(table, process_pb2.ProcessSelector(pid=42)) is table.found  # type: ignore[arg-type]
    assert select(table, process_pb2.ProcessSelector(tag="web")) is table.found  # type: ignore[arg-type]
    assert table.asked == [(42, ""), (0, "web")]


def test_the_wire_form_of_an_exit() -> None:
    killed = exited_pb(Exited(exit_code=-1, signal=9, timed_out=True, error="timed out", end_time=12.5))
    assert (killed.exit_code, killed.signal, killed.timed_out, killed.error) == (-1, 9, True, "timed out")
    assert killed.end_time.ToNanoseconds() == 12_500_000_000


def test_follow_yields_keepalives_and_ends_after_the_exit() -> None:
    async def scenario() -> list[Chunk | Exited | None]:
        sub = Subscriber(100)
        events: list[Chunk | Exited | None] = []
        async for event in follow(sub, 0.01):
            events.append(event)
            if event is None and len(events) == 1:
                sub.push(Chunk(STDOUT, b"hi"))
                sub.push(Exited(exit_code=0, signal=0, timed_out=False, error="", end_time=1.0))
                sub.push(Chunk(STDOUT, b"never"))
        return events

    events = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert events[0] is None
    assert events[1:] == [Chunk(STDOUT, b"hi"), Exited(exit_code=0, signal=0, timed_out=False, error="", end_time=1.0)]


def test_follow_turns_an_overflow_into_resource_exhausted() -> None:
    async def scenario() -> None:
        sub = Subscriber(4)
        sub.push(Chunk(STDOUT, b"far too much"))
        with pytest.raises(RpcError) as err:
            async for _ in follow(sub, 1):
                pass
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "reconnect" in err.value.message

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_a_program_that_cannot_start_exits_as_a_shell_would_report_it() -> None:
    missing = not_started("nope", FileNotFoundError(2, "No such file or directory"))
    assert (missing.exit_code, missing.signal, missing.error) == (127, 0, "command not found: nope")
    denied = not_started("./x", PermissionError(13, "Permission denied"))
    assert (denied.exit_code, denied.error) == (126, "permission denied: ./x")
    other = not_started("big", OSError(7, "Argument list too long"))
    assert (other.exit_code, other.error) == (126, "cannot run big: Argument list too long")
    assert not missing.timed_out and missing.end_time > 0
