"""Terminals under heavy output, through the real gateway: nobody is cut off for reading.

The stack: the gateway, the routing stand-in instance_svc.testing, and one real guest agent on
this host whose terminal pacing bounds are shortened (a reader that stopped is detached after 3 s
instead of 30) so that a test of it is not half a minute long.

`seq 1 3000000` writes 20.9 MB (23.9 MB once the terminal turns each \\n into \\r\\n). Each test
runs it between two markers the shell computes (BEGIN-2, END-4: the echoed command line holds
`$((1+1))`, not the result) and checks the bytes between them exactly: every line, in order, once.
"""

from __future__ import annotations

import json
import os
import pty
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import grpc
import pytest
from websockets.sync.client import connect

from cyberdesk import Cyberdesk
from cyberdesk._sync.shell import Shell
from cyberdesk_proto.v1 import process_pb2, process_pb2_grpc
from cyberdesk_stack.processes import guest_agent
from tests.cli.stack import CLI
from tests.gateway_svc.conftest import AGENT_TOKEN, INTERNAL_TOKEN, gateway_env
from tests.support.procs import ROOT, free_port, service

INSTANCE = "i-shell"
LINES = 3_000_000
STALL_SECONDS = 3
COMMAND = f"echo BEGIN-$((1+1)); seq 1 {LINES}; echo END-$((2+2))"
PACING_ENV = {
    "CYBERDESK_AGENT_PTY_WAIT_SECONDS": "1",
    "CYBERDESK_AGENT_PTY_STALL_SECONDS": str(STALL_SECONDS),
    # Far beyond the whole output: a stalled reader is detached for stalling, not for the bytes.
    "CYBERDESK_AGENT_PTY_BEHIND_BYTES": str(64 * 1024 * 1024),
    "CYBERDESK_AGENT_KILL_GRACE_SECONDS": "1",
}


@dataclass
class ShellStack:
    gateway: str
    key: str
    agent_target: str
    http: str

    def metadata(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.key}"),)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ShellStack]:
    tmp = tmp_path_factory.mktemp("shells")
    state = tmp / "state"
    routes = tmp / "routes.json"
    instance_addr, gateway, http = (f"127.0.0.1:{free_port()}" for _ in range(3))
    with ExitStack() as ctx:
        agent = ctx.enter_context(guest_agent(tmp / "agent", INSTANCE, token=AGENT_TOKEN, env=PACING_ENV))
        route = {"tenant": "tenant-s", "state": "RUNNING", "target": agent.target, "token": AGENT_TOKEN}
        routes.write_text(json.dumps({INSTANCE: route}))
        upstream = {"UPSTREAM_ADDR": instance_addr, "UPSTREAM_ROUTES": str(routes)}
        ctx.enter_context(
            service(
                "instance_svc.testing", instance_addr, {**upstream, "CYBERDESK_INTERNAL_TOKEN": INTERNAL_TOKEN}, tmp
            )
        )
        env = gateway_env(
            state, instance_addr, redis_url, CYBERDESK_GATEWAY_ADDR=gateway, CYBERDESK_GATEWAY_HTTP_ADDR=http
        )
        ctx.enter_context(service("gateway_svc", gateway, env, tmp))
        made = subprocess.run(
            [sys.executable, "-m", "gateway_svc", "keys", "create", "--tenant", "tenant-s", "--name", "shells"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "CYBERDESK_STATE_DIR": str(state)},
            capture_output=True,
            text=True,
            check=True,
        )
        key = next(line.split()[1] for line in made.stdout.splitlines() if line.startswith("secret"))
        yield ShellStack(gateway, key, agent.target, http)


@cache
def expected() -> bytes:
    return b"".join(b"%d\r\n" % n for n in range(1, LINES + 1))


def between_markers(output: bytes) -> bytes:
    """What the terminal showed between BEGIN-2 and END-4 (the command's echo names neither)."""
    start = output.index(b"BEGIN-2\r\n") + len(b"BEGIN-2\r\n")
    return output[start : output.index(b"END-4", start)]


def check_every_line(output: bytes) -> None:
    got = between_markers(output)
    if got != expected():
        lines = got.split(b"\r\n")
        raise AssertionError(f"{len(lines) - 1} lines instead of {LINES}; last: {lines[-2:]!r}")


# -- the CLI on a real terminal -------------------------------------------------------------------


def test_seq_in_cyberdesk_shell_arrives_whole_and_the_shell_goes_on(stack: ShellStack, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYBERDESK_")}
    env.update(
        CYBERDESK_ENDPOINT=stack.gateway, CYBERDESK_API_KEY=stack.key, CYBERDESK_CONFIG=str(tmp_path / "none.json")
    )
    pid, fd = pty.fork()
    if pid == 0:  # the child: `cyberdesk shell` on a real terminal, as a user runs it
        os.execve(CLI, [CLI, "shell", INSTANCE, "--", "bash", "--norc", "-i"], env)
    buffer = bytearray()

    def read_until(pattern: bytes, limit: float = 180) -> None:
        # As fast as the CLI writes: big reads, each searched once (with an overlap for a split token).
        deadline = time.monotonic() + limit
        scan = len(buffer)
        while not re.search(pattern, buffer[scan:]):
            assert time.monotonic() < deadline, f"no {pattern!r} in {bytes(buffer[-400:])!r}"
            if select.select([fd], [], [], 0.2)[0]:
                scan = max(scan, len(buffer) - 64)
                buffer.extend(os.read(fd, 1 << 20))

    try:
        read_until(rb"[#$] $")  # the prompt: typed-ahead input may be flushed by the shell's start-up
        os.write(fd, COMMAND.encode() + b"\r")
        read_until(rb"END-4\r\n")
        check_every_line(bytes(buffer))
        mark = len(buffer)
        os.write(fd, b"echo after-$((3+3))\r")
        read_until(rb"after-6\r\n")
        assert b"RESOURCE_EXHAUSTED" not in buffer[mark:]
        os.write(fd, b"exit 7\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 7, bytes(buffer[-400:])
    finally:
        os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


# -- the SDK --------------------------------------------------------------------------------------


def read_through(shell: Shell, chunks: list[bytes], token: bytes) -> None:
    """Take the shell's output into `chunks` until `token` has come (each chunk searched once)."""
    tail = b""
    while True:
        chunk = shell.recv(timeout=120)
        assert chunk, f"the terminal ended: {shell.exited} {shell.error}"
        chunks.append(chunk)
        window = tail + chunk
        if token in window:
            return
        tail = window[-len(token) :]


def test_seq_in_an_sdk_shell_arrives_whole_and_the_shell_goes_on(stack: ShellStack) -> None:
    with Cyberdesk(api_key=stack.key, endpoint=stack.gateway) as client:
        shell = client.instances.handle(INSTANCE).shell(argv=["bash", "--norc", "-i"])
        try:
            chunks: list[bytes] = []
            shell.send(COMMAND + "\n")
            read_through(shell, chunks, b"END-4\r\n")
            check_every_line(b"".join(chunks))
            shell.send("echo after-$((3+3)); exit 7\n")
            assert shell.wait(60) is not None and shell.exit_code == 7
            assert shell.error is None
        finally:
            shell.close()


# -- the WebSocket face ---------------------------------------------------------------------------


def small_receive_buffer(addr: str) -> socket.socket:
    """A TCP connection to `addr` whose receive buffer stays at 256 KiB (no autotuning up to 32 MiB)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    host, port = addr.rsplit(":", 1)
    sock.connect((host, int(port)))
    return sock


def test_a_websocket_reader_that_stops_holds_the_writer_back_and_loses_nothing(stack: ShellStack) -> None:
    url = f"ws://{stack.http}/v1/instances/{INSTANCE}/pty"
    headers = {"authorization": f"Bearer {stack.key}"}
    deadline = time.monotonic() + 30
    while True:  # the HTTP face starts beside the gRPC one, whose health the fixture waited for
        try:
            ws = connect(url, sock=small_receive_buffer(stack.http), additional_headers=headers, max_size=None)
            break
        except OSError:
            assert time.monotonic() < deadline, "the gateway's HTTP face never answered"
            time.sleep(0.2)
    with ws:
        ws.send(json.dumps({"type": "open", "argv": ["bash", "--norc", "-i"]}))
        started = json.loads(ws.recv(timeout=60))
        assert started["type"] == "started", started
        ws.send((COMMAND + "\n").encode())  # a binary frame: terminal bytes
        chunks: list[bytes] = []

        def take_through(token: bytes) -> None:
            tail = b""
            while True:
                frame = ws.recv(timeout=120)
                assert isinstance(frame, bytes), frame  # a control frame here would be an error or the exit
                chunks.append(frame)
                window = tail + frame
                if token in window:
                    return
                tail = window[-len(token) :]

        take_through(b"BEGIN-2\r\n")
        # The relay sends a frame only once the socket took the previous one, so a client that
        # stops reading stops the relay reading its call, and back-pressure reaches seq.
        wait_writer_blocked(int(started["pid"]), "seq")
        take_through(b"END-4\r\n")
        check_every_line(b"".join(chunks))
        ws.send(b"exit 3\n")
        while not isinstance(frame := ws.recv(timeout=60), str):
            pass
        assert json.loads(frame) == {**json.loads(frame), "type": "exit", "exitCode": 3}


# -- readers on raw gRPC: one that stops ------------------------------------------------------------


class Reader:
    """A ConnectPty call (through the gateway, or `direct` to the agent) read only when the test says so.

    `direct` also keeps the call's HTTP/2 window at 64 KiB (no BDP growth): what the reader does
    not take then waits in the agent, not in buffers on the way.
    """

    def __init__(self, stack: ShellStack, first: process_pb2.ConnectPtyRequest, *, direct: bool = False) -> None:
        self._requests: queue.Queue[process_pb2.ConnectPtyRequest | None] = queue.Queue()
        self._requests.put(first)
        if direct:
            options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 64 * 1024)]
            self._channel = grpc.insecure_channel(stack.agent_target, options=options)
            metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {AGENT_TOKEN}"),)
        else:
            self._channel = grpc.insecure_channel(stack.gateway)
            metadata = stack.metadata()
        stub = process_pb2_grpc.ProcessServiceStub(self._channel)
        self.call = stub.ConnectPty(iter(self._requests.get, None), metadata=metadata, timeout=300)
        self.output = bytearray()
        self.exited: process_pb2.ProcessExited | None = None

    def started(self) -> int:
        reply = next(self.call)
        assert reply.HasField("started"), reply
        return int(reply.started.pid)

    def type(self, text: str) -> None:
        self._requests.put(process_pb2.ConnectPtyRequest(input=text.encode()))

    def read_until(self, token: bytes) -> None:
        """Take replies until `token` is in the output (or the exit came)."""
        scan = len(self.output)
        while token not in self.output[scan:] and self.exited is None:
            scan = max(scan, len(self.output) - len(token))
            reply = next(self.call)
            kind = reply.WhichOneof("event")
            if kind == "output":
                self.output.extend(reply.output)
            elif kind == "exited":
                self.exited = reply.exited

    def read_to_end(self) -> grpc.RpcError | None:
        """Take every reply left; the error that ended the call, if one did."""
        try:
            self.read_until(b"\0never\0")
        except grpc.RpcError as err:
            return err
        except StopIteration:
            pass
        return None

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        self._channel.close()


def _open(argv: list[str]) -> process_pb2.ConnectPtyRequest:
    return process_pb2.ConnectPtyRequest(instance_id=INSTANCE, open=process_pb2.PtyOpen(argv=argv))


def _attach(pid: int) -> process_pb2.ConnectPtyRequest:
    selector = process_pb2.ProcessSelector(pid=pid)
    return process_pb2.ConnectPtyRequest(instance_id=INSTANCE, attach=process_pb2.PtyAttach(selector=selector))


def wait_writer_blocked(session: int, name: str, limit: float = 90) -> None:
    """Wait until the process `name` of the terminal's session is alive and wrote nothing for a second.

    Fails if it finished instead: then something on the way buffered the whole output. Every hop
    may hold a few MiB first (on loopback the kernel lets a socket buffer grow to tcp_rmem's 32 MiB,
    hence `small_receive_buffer`), so this waits for the buffers to fill rather than a fixed time.
    """
    deadline = time.monotonic() + limit
    while not (
        pids := [
            int(entry.name)
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and _stat(entry)[:2] == (name, session)
        ]
    ):  # the marker before it is echoed by the shell itself, maybe before it forked `name`
        assert time.monotonic() < deadline, f"no {name} in session {session} (it finished while nobody read?)"
        time.sleep(0.05)
    assert len(pids) == 1, f"{name} in session {session}: {pids}"
    proc = Path(f"/proc/{pids[0]}")
    before = _wchar(proc)
    while True:
        assert before >= 0, f"{name} finished while nobody read: something buffered all its output"
        time.sleep(1)
        now = _wchar(proc)
        if now == before:
            return
        assert time.monotonic() < deadline, f"{name} still writing after {limit} s ({now} bytes)"
        before = now


def _stat(proc: Path) -> tuple[str, int]:
    try:
        raw = (proc / "stat").read_text()
    except OSError:
        return "", 0
    return raw[raw.find("(") + 1 : raw.rfind(")")], int(raw[raw.rfind(")") + 2 :].split()[3])


def _wchar(proc: Path) -> int:
    """Bytes the process wrote so far; -1 once it is gone (or a zombie)."""
    try:
        lines = (proc / "io").read_text().splitlines()
    except OSError:
        return -1
    if _stat(proc)[0] == "":
        return -1
    return int(next(line for line in lines if line.startswith("wchar")).split()[1])


def test_an_sdk_reader_alone_that_stops_reading_holds_the_writer_back_and_loses_nothing(stack: ShellStack) -> None:
    with Cyberdesk(api_key=stack.key, endpoint=stack.gateway) as client:
        shell = client.instances.handle(INSTANCE).shell(argv=["bash", "--norc", "-i"])
        try:
            shell.send(COMMAND + "\n")
            chunks = [shell.recv(timeout=60)]
            while b"BEGIN-2" not in b"".join(chunks[-2:]):
                chunks.append(shell.recv(timeout=60))
            # Twice the stall bound without reading. Every hop has a bounded buffer (the SDK's
            # reply window, gRPC flow control at the gateway, the agent's window), so seq ends up
            # blocked on its terminal: nothing is dropped, nobody is detached.
            time.sleep(2 * STALL_SECONDS)
            wait_writer_blocked(shell.pid, "seq")
            read_through(shell, chunks, b"END-4\r\n")
            check_every_line(b"".join(chunks))
            shell.send("exit 3\n")
            assert shell.wait(60) is not None and shell.exit_code == 3 and shell.error is None
        finally:
            shell.close()


def test_of_two_readers_the_one_that_stops_is_detached_alone_and_the_other_gets_every_line(
    stack: ShellStack,
) -> None:
    first = Reader(stack, _open(["bash", "--norc", "-i"]))
    second: Reader | None = None
    try:
        shell = first.started()
        # Straight to the agent: through the gateway, the buffers of two more hops (each HTTP/2
        # window grown by BDP probing, loopback socket buffers of up to 32 MiB) may hold so much of
        # the 26 MB that the agent never has a backlog for the reader, and rightly keeps it.
        second = Reader(stack, _attach(shell), direct=True)
        assert second.started() == shell
        first.type(COMMAND + "\n")
        second.read_until(b"BEGIN-2\r\n")  # then `second` reads nothing more
        first.read_until(b"END-4\r\n")
        check_every_line(bytes(first.output))
        # The terminal goes on for the reader that kept reading.
        first.type("echo after-$((3+3))\n")
        first.read_until(b"after-6\r\n")
        # `second` sees, once it reads again, why it was detached, after what was already on its way.
        err = second.read_to_end()
        assert err is not None and err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert f"read nothing for {STALL_SECONDS} s" in (err.details() or ""), err.details()
        assert second.exited is None and b"after-6" not in second.output
        first.type("exit 4\n")
        first.read_until(b"\0never\0")
        assert first.exited is not None and first.exited.exit_code == 4
    finally:
        first.close()
        if second is not None:
            second.close()


# -- the end of a terminal whose program exits at once ------------------------------------------------


def test_ctrl_d_typed_ahead_ends_cat_with_exit_0_every_time(stack: ShellStack) -> None:
    # cat closes 0, 1 and 2 and only then exits; an agent that closed the terminal's master as
    # soon as the last slave end was closed hung up the session in that gap, and the kernel's
    # SIGHUP killed cat (about 1 run in 8 with the ^D typed ahead, as here, on an idle machine).
    outcomes = []
    for _ in range(40):
        reader = Reader(stack, _open(["cat"]))
        try:
            reader.started()
            for ch in "hello pty\n\x04":  # keystroke by keystroke, before cat has even started
                reader.type(ch)
            reader.read_until(b"\0never\0")
        finally:
            reader.close()
        assert reader.exited is not None
        outcomes.append((reader.exited.exit_code, reader.exited.signal, bytes(reader.output).count(b"hello pty\r\n")))
    assert outcomes == [(0, 0, 2)] * 40
