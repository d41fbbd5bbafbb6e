"""ConnectPty against a real agent: resize seen by `stty size`, Ctrl-C, several clients, hang-up."""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cyberdesk_proto.v1 import process_pb2, process_pb2_grpc
from tests.guest_agent.integration.conftest import INSTANCE_ID, RunningAgent, running_agent

FAST = {"CYBERDESK_AGENT_KEEPALIVE_SECONDS": "0.5", "CYBERDESK_AGENT_KILL_GRACE_SECONDS": "1", "DISPLAY": ""}
_END = object()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("ptyagent"), FAST) as running:
        yield running


class Terminal:
    """A ConnectPty client: requests go through a queue, responses are read by a thread."""

    def __init__(self, agent: RunningAgent, first: process_pb2.ConnectPtyRequest) -> None:
        self._requests: queue.Queue[object] = queue.Queue()
        self._requests.put(first)
        stub = process_pb2_grpc.ProcessServiceStub(agent.channel)
        self.call = stub.ConnectPty(self._iterate(), metadata=agent.metadata)
        self.output = b""
        self.exited: process_pb2.ProcessExited | None = None
        self.error: grpc.RpcError | None = None
        self.pid = 0
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _iterate(self) -> Iterator[process_pb2.ConnectPtyRequest]:
        while True:
            item = self._requests.get()
            if item is _END:
                return
            yield item  # type: ignore[misc]

    def _read(self) -> None:
        try:
            for message in self.call:
                kind = message.WhichOneof("event")
                with self._lock:
                    if kind == "started":
                        self.pid = message.started.pid
                        self._started.set()
                    elif kind == "output":
                        self.output += message.output
                    elif kind == "exited":
                        self.exited = message.exited
        except grpc.RpcError as err:
            self.error = err
        finally:
            self._started.set()

    def started(self) -> int:
        assert self._started.wait(20), "no started event"
        if self.error is not None:
            raise self.error
        return self.pid

    def send(self, **event: object) -> None:
        self._requests.put(process_pb2.ConnectPtyRequest(**event))  # type: ignore[arg-type]

    def type(self, text: str) -> None:
        self.send(input=text.encode())

    def wait_for(self, pattern: bytes, since: int = 0, timeout: float = 20.0) -> int:
        """Wait until `pattern` (a regex) appears in the output after offset `since`; returns its end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = re.search(pattern, self.output[since:])
                if found:
                    return since + found.end()
            if self.error is not None or self.exited is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not seen; output so far: {self.output[since:][-500:]!r}")

    def wait_exit(self, timeout: float = 20.0) -> process_pb2.ProcessExited:
        self._reader.join(timeout)
        assert self.exited is not None, f"no exit event (error: {self.error})"
        return self.exited

    def close(self) -> None:
        self._requests.put(_END)
        self.call.cancel()
        self._reader.join(10)


def open_request(**fields: object) -> process_pb2.ConnectPtyRequest:
    return process_pb2.ConnectPtyRequest(instance_id=INSTANCE_ID, open=process_pb2.PtyOpen(**fields))  # type: ignore[arg-type]


def attach_request(tag: str) -> process_pb2.ConnectPtyRequest:
    return process_pb2.ConnectPtyRequest(
        instance_id=INSTANCE_ID, attach=process_pb2.PtyAttach(selector=process_pb2.ProcessSelector(tag=tag))
    )


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: the process went between open and read
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] == b"Z"


def wait_until(predicate: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def session_members(sid: int, name: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            comm = stat[stat.find(b"(") + 1 : stat.rfind(b")")]
            fields = stat[stat.rfind(b")") + 2 :].split()
            if comm == name.encode() and int(fields[3]) == sid and fields[0] != b"Z":
                found.append(int(entry))
    return found


def test_shell_sees_term_and_resize(agent: RunningAgent) -> None:
    term = Terminal(agent, open_request(size=process_pb2.PtySize(cols=80, rows=24), env={"MARK": "m"}))
    try:
        term.started()
        term.type("echo $TERM-$MARK-$((6*7)); stty size\n")
        end = term.wait_for(rb"xterm-256color-m-42\r?\n24 80")
        term.send(resize=process_pb2.PtySize(cols=132, rows=43))
        term.type("stty size\n")
        term.wait_for(rb"[\r\n]43 132\r\n", since=end)
        term.type("exit 5\n")
        exited = term.wait_exit()
        assert exited.exit_code == 5
    finally:
        term.close()


def test_ctrl_c_interrupts_the_foreground_job(agent: RunningAgent) -> None:
    term = Terminal(agent, open_request(argv=["bash", "--norc", "-i"]))
    try:
        shell = term.started()
        term.type("sleep 100\n")
        wait_until(lambda: session_members(shell, "sleep"), "sleep to run in the terminal")
        (sleeper,) = session_members(shell, "sleep")
        term.type("\x03")
        wait_until(lambda: gone(sleeper), "Ctrl-C to stop sleep")
        mark = len(term.output)
        term.type("echo back-$((40+2))\n")
        term.wait_for(rb"back-42", since=mark)
        # The same through a signal message, sent to the foreground job rather than the shell.
        term.type("sleep 200\n")
        wait_until(lambda: session_members(shell, "sleep"), "the second sleep to run")
        (sleeper,) = session_members(shell, "sleep")
        term.send(signal=process_pb2.SIGNAL_SIGINT)
        wait_until(lambda: gone(sleeper), "SIGINT to stop sleep")
        assert not gone(shell)
    finally:
        term.close()


def test_two_clients_share_a_terminal_and_the_last_one_hangs_up(agent: RunningAgent) -> None:
    first = Terminal(agent, open_request(argv=["bash", "--norc", "-i"], tag="shared"))
    second = None
    try:
        shell = first.started()
        second = Terminal(agent, attach_request("shared"))
        assert second.started() == shell
        first.type("echo hello-$((1+1))\n")
        first.wait_for(rb"hello-2")
        second.wait_for(rb"hello-2")
        second.type("echo from-second-$((2+2))\n")
        first.wait_for(rb"from-second-4")
        second.close()
        mark = len(first.output)
        first.type("echo still-$((3+3))\n")
        first.wait_for(rb"still-6", since=mark)
        assert not gone(shell)
        first.close()
        wait_until(lambda: gone(shell), "the terminal to be hung up after its last client left")
    finally:
        first.close()
        if second is not None:
            second.close()


def test_background_terminal_survives_and_replays(agent: RunningAgent) -> None:
    term = Terminal(agent, open_request(argv=["bash", "--norc", "-i"], tag="keep", background=True))
    shell = term.started()
    term.type("echo kept-$((5+5))\n")
    term.wait_for(rb"kept-10")
    term.close()
    time.sleep(0.5)
    assert not gone(shell)
    again = Terminal(agent, attach_request("keep"))
    try:
        assert again.started() == shell
        again.wait_for(rb"kept-10")  # replayed from the ring buffer
        again.type("exit 0\n")
        assert again.wait_exit().exit_code == 0
    finally:
        again.close()


def test_detach_applies_what_was_sent_before_and_ends_with_ok(agent: RunningAgent) -> None:
    """A client that types and leaves at once: the keystrokes reach the terminal, its stream ends OK.

    A cancelled call would lose keystrokes still in flight; `detach` is applied after them. The
    terminal (background) goes on, and the next client finds what the keystrokes did.
    """
    term = Terminal(agent, open_request(argv=["bash", "--norc", "-i"], tag="leaver", background=True))
    shell = term.started()
    term.type("export MARK=kept-$((6*7))\n")
    term.send(detach=process_pb2.PtyDetach())
    term._reader.join(10)
    term.close()
    assert (term.error, term.exited) == (None, None), "the stream did not end with OK after detach"
    assert not gone(shell)
    again = Terminal(agent, attach_request("leaver"))
    try:
        assert again.started() == shell
        since = len(again.output)
        again.type("echo mark=$MARK; exit 0\n")
        again.wait_for(rb"mark=kept-42", since)
        assert again.wait_exit().exit_code == 0
    finally:
        again.close()


def test_bad_terminal_requests(agent: RunningAgent) -> None:
    cases = [
        (process_pb2.ConnectPtyRequest(instance_id=INSTANCE_ID, input=b"ls\n"), grpc.StatusCode.INVALID_ARGUMENT),
        (attach_request("no-such-terminal"), grpc.StatusCode.NOT_FOUND),
        (process_pb2.ConnectPtyRequest(instance_id="i-other", open=process_pb2.PtyOpen()), grpc.StatusCode.NOT_FOUND),
        (open_request(cwd="/no/such/dir"), grpc.StatusCode.NOT_FOUND),
        (open_request(size=process_pb2.PtySize(cols=100_000)), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for request, code in cases:
        term = Terminal(agent, request)
        try:
            with pytest.raises(grpc.RpcError) as err:
                term.started()
            assert err.value.code() == code, request
        finally:
            term.close()


def test_missing_program_in_a_terminal(agent: RunningAgent) -> None:
    term = Terminal(agent, open_request(argv=["no-such-program-xyz"]))
    try:
        term.started()
        exited = term.wait_exit()
        assert exited.exit_code == 127
        assert b"no-such-program-xyz" in term.output
    finally:
        term.close()


def test_terminal_output_is_raw_bytes(agent: RunningAgent) -> None:
    term = Terminal(agent, open_request(argv=["sh", "-c", "printf 'a\\377b'"]))
    try:
        term.started()
        assert term.wait_exit().exit_code == 0
        assert term.output == b"a\xffb"
    finally:
        term.close()
