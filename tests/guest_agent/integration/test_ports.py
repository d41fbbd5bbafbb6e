"""PortService.OpenPort against a real agent process and real TCP servers on loopback."""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Iterator

import grpc
import pytest

from cyberdesk_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from tests.guest_agent.integration.conftest import RunningAgent
from tests.support.procs import free_port


def _requests(items: queue.Queue[agent_pb2.OpenPortRequest | None]) -> Iterator[agent_pb2.OpenPortRequest]:
    while (item := items.get()) is not None:
        yield item


class _Server:
    """A one-connection TCP server on 127.0.0.1 running `handler(conn)` in a thread."""

    def __init__(self, handler: object) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self._handler = handler
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            self._handler(self, conn)  # type: ignore[operator]
        self.sock.close()


def _echo_until_eof(server: _Server, conn: socket.socket) -> None:
    while data := conn.recv(65536):
        server.received += data
        conn.sendall(data.upper())


def test_bytes_both_ways_and_client_half_close(bound_agent: RunningAgent) -> None:
    server = _Server(_echo_until_eof)
    stub = agent_pb2_grpc.PortServiceStub(bound_agent.channel)
    items: queue.Queue[agent_pb2.OpenPortRequest | None] = queue.Queue()
    items.put(agent_pb2.OpenPortRequest(instance_id=bound_agent.instance_id, port=server.port, data=b"hello "))
    call = stub.OpenPort(_requests(items), metadata=bound_agent.metadata, timeout=20)
    replies = iter(call)
    assert next(replies).connected
    got = bytearray()
    while len(got) < 6:
        got += next(replies).data
    assert got == b"HELLO "
    big = bytes(range(256)) * 8192  # 2 MiB in one message: the agent writes it in drained pieces
    items.put(agent_pb2.OpenPortRequest(data=big))
    items.put(None)  # half-close: the server reads EOF, stops echoing and closes
    rest = b"".join(r.data for r in replies)
    assert rest == big.upper()
    assert call.code() is grpc.StatusCode.OK
    server.thread.join(5)
    assert bytes(server.received) == b"hello " + big


def test_service_half_close_keeps_the_other_direction(bound_agent: RunningAgent) -> None:
    def greet_then_read(server: _Server, conn: socket.socket) -> None:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        while data := conn.recv(65536):
            server.received += data

    server = _Server(greet_then_read)
    stub = agent_pb2_grpc.PortServiceStub(bound_agent.channel)
    items: queue.Queue[agent_pb2.OpenPortRequest | None] = queue.Queue()
    items.put(agent_pb2.OpenPortRequest(instance_id=bound_agent.instance_id, port=server.port))
    call = stub.OpenPort(_requests(items), metadata=bound_agent.metadata, timeout=20)
    replies = iter(call)
    assert next(replies).connected
    data = bytearray()
    while True:
        reply = next(replies)
        if reply.eof:
            break
        data += reply.data
    assert data == b"banner"
    items.put(agent_pb2.OpenPortRequest(data=b"after the eof"))
    items.put(None)
    assert list(replies) == []
    assert call.code() is grpc.StatusCode.OK
    server.thread.join(5)
    assert bytes(server.received) == b"after the eof"


def test_nothing_listening_is_unavailable_naming_the_port(bound_agent: RunningAgent) -> None:
    port = free_port()
    stub = agent_pb2_grpc.PortServiceStub(bound_agent.channel)
    first = agent_pb2.OpenPortRequest(instance_id=bound_agent.instance_id, port=port, data=b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.OpenPort(iter([first]), metadata=bound_agent.metadata, timeout=10))
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == f"nothing listens on port {port} in the instance"


@pytest.mark.parametrize(
    ("instance_id", "port", "metadata", "code"),
    [
        ("i-someone-else", 80, None, grpc.StatusCode.NOT_FOUND),
        (None, 0, None, grpc.StatusCode.INVALID_ARGUMENT),
        (None, 70000, None, grpc.StatusCode.INVALID_ARGUMENT),
        (None, 80, (("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
        (None, 80, (), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_refusals(
    bound_agent: RunningAgent,
    instance_id: str | None,
    port: int,
    metadata: tuple[tuple[str, str], ...] | None,
    code: grpc.StatusCode,
) -> None:
    stub = agent_pb2_grpc.PortServiceStub(bound_agent.channel)
    first = agent_pb2.OpenPortRequest(instance_id=instance_id or bound_agent.instance_id, port=port)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.OpenPort(iter([first]), metadata=bound_agent.metadata if metadata is None else metadata, timeout=10))
    assert err.value.code() is code


def test_a_service_on_the_ipv6_loopback_only_is_reached(bound_agent: RunningAgent) -> None:
    # Node's `localhost` listens on ::1 alone on many systems; the agent tries 127.0.0.1, then ::1.
    sock = socket.create_server(("::1", 0), family=socket.AF_INET6)
    port = sock.getsockname()[1]

    def answer() -> None:
        conn, _ = sock.accept()
        with conn:
            conn.sendall(b"via ::1")
        sock.close()

    threading.Thread(target=answer, daemon=True).start()
    stub = agent_pb2_grpc.PortServiceStub(bound_agent.channel)
    first = agent_pb2.OpenPortRequest(instance_id=bound_agent.instance_id, port=port)
    items: queue.Queue[agent_pb2.OpenPortRequest | None] = queue.Queue()
    items.put(first)
    call = stub.OpenPort(_requests(items), metadata=bound_agent.metadata, timeout=20)
    replies = iter(call)
    assert next(replies).connected
    data = bytearray()
    for reply in replies:
        if reply.eof:
            items.put(None)
        data += reply.data
    assert data == b"via ::1" and call.code() is grpc.StatusCode.OK
