"""The WebSocket PTY's JSON control frames: open/attach first, resize/signal/detach later, bad frames, server frames."""

from __future__ import annotations

import json

import grpc
import pytest

from cyberdesk_common.status import RpcError, invalid_argument
from cyberdesk_proto.v1 import process_pb2
from gateway_svc.rest.control_frames import close_code, error_frame, parse_control_frame, server_frame


def bad(text: str, first: bool) -> str:
    with pytest.raises(RpcError) as caught:
        parse_control_frame(text, first=first)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.message


def test_open_with_every_field() -> None:
    frame = {
        "type": "open",
        "cols": 120,
        "rows": 40,
        "argv": ["bash", "-l"],
        "env": {"TERM": "xterm", "N": 1},
        "cwd": "/tmp",
        "tag": "web",
        "background": True,
    }
    request = parse_control_frame(json.dumps(frame), first=True)
    assert request.WhichOneof("event") == "open"
    opened = request.open
    assert (opened.size.cols, opened.size.rows) == (120, 40)
    assert list(opened.argv) == ["bash", "-l"] and dict(opened.env) == {"TERM": "xterm", "N": "1"}
    assert (opened.cwd, opened.tag, opened.background) == ("/tmp", "web", True)


def test_open_with_nothing_but_its_type() -> None:
    request = parse_control_frame('{"type": "open"}', first=True)
    assert request.HasField("open") and request.open == process_pb2.PtyOpen(size=process_pb2.PtySize())


def test_attach_by_pid_or_by_tag() -> None:
    assert parse_control_frame('{"type": "attach", "pid": 12}', first=True).attach.selector.pid == 12
    assert parse_control_frame('{"type": "attach", "tag": "web"}', first=True).attach.selector.tag == "web"
    assert 'exactly one of "pid" and "tag"' in bad('{"type": "attach"}', first=True)
    assert 'exactly one of "pid" and "tag"' in bad('{"type": "attach", "pid": 1, "tag": "x"}', first=True)


def test_resize() -> None:
    request = parse_control_frame('{"type": "resize", "cols": 132, "rows": 43}', first=False)
    assert request.WhichOneof("event") == "resize" and (request.resize.cols, request.resize.rows) == (132, 43)


def test_detach() -> None:
    request = parse_control_frame('{"type": "detach"}', first=False)
    assert request.WhichOneof("event") == "detach"


@pytest.mark.parametrize("name", ["SIGINT", "sigint", "SIGNAL_SIGINT", "signal_sigint", 2])
def test_signal_by_name_with_or_without_prefix_or_by_number(name: str | int) -> None:
    request = parse_control_frame(json.dumps({"type": "signal", "signal": name}), first=False)
    assert request.WhichOneof("event") == "signal" and request.signal == process_pb2.SIGNAL_SIGINT


@pytest.mark.parametrize("name", ["INT", "SIGFOO", 0, 4, True, None, 2.0])
def test_unknown_signals_are_refused(name: object) -> None:
    assert "is not one of SIGHUP, SIGINT" in bad(json.dumps({"type": "signal", "signal": name}), first=False)


@pytest.mark.parametrize(
    ("text", "first", "message"),
    [
        ("{", True, "control frame is not valid JSON: Expecting property name enclosed in double quotes"),
        ("", False, "control frame is not valid JSON: Expecting value"),
        ("[1]", True, 'a control frame is a JSON object with a "type"'),
        ('{"cols": 1}', False, 'a control frame is a JSON object with a "type"'),
        ('{"type": 3}', False, 'a control frame is a JSON object with a "type"'),
        # open/attach only first, resize/signal only later
        ('{"type": "resize", "cols": 1, "rows": 1}', True, "type 'resize' is not allowed here; expected one of"),
        ('{"type": "open"}', False, "type 'open' is not allowed here; expected one of ['detach', 'resize', 'signal']"),
        ('{"type": "detach"}', True, "type 'detach' is not allowed here"),
        ('{"type": "detach", "now": true}', False, "control frame 'detach': unknown field 'now'"),
        ('{"type": "attach", "pid": 1}', False, "type 'attach' is not allowed here"),
        ('{"type": "close"}', False, "type 'close' is not allowed here"),
        ('{"type": "open", "colz": 80}', True, "control frame 'open': unknown field 'colz'"),
        ('{"type": "resize", "cols": 1, "rows": 1, "x": 0}', False, "control frame 'resize': unknown field 'x'"),
        ('{"type": "resize", "cols": -1}', False, "control frame 'resize': cols must be a non-negative integer"),
        ('{"type": "resize", "rows": "24"}', False, "rows must be a non-negative integer"),
        ('{"type": "resize", "rows": true}', False, "rows must be a non-negative integer"),
        ('{"type": "resize", "cols": 4294967296}', False, "cols must be a non-negative integer"),
        ('{"type": "open", "argv": "bash"}', True, "control frame 'open': argv must be a list"),
        ('{"type": "open", "env": ["A=1"]}', True, "control frame 'open': env must be an object"),
        ('{"type": "attach", "pid": "7"}', True, "control frame 'attach': pid must be a non-negative integer"),
    ],
)
def test_bad_frames_name_the_problem(text: str, first: bool, message: str) -> None:
    assert message in bad(text, first)


def test_server_frames() -> None:
    assert server_frame(process_pb2.ConnectPtyResponse(output=b"\x1b[0mhi")) == b"\x1b[0mhi"
    started = server_frame(process_pb2.ConnectPtyResponse(started=process_pb2.ProcessStarted(pid=12, tag="web")))
    assert isinstance(started, str) and json.loads(started) == {"type": "started", "pid": 12, "tag": "web"}
    exited = server_frame(process_pb2.ConnectPtyResponse(exited=process_pb2.ProcessExited(exit_code=3)))
    assert isinstance(exited, str)
    assert json.loads(exited)["type"] == "exit" and json.loads(exited)["exitCode"] == 3
    # Keepalives are not relayed: WebSocket has its own pings.
    assert server_frame(process_pb2.ConnectPtyResponse(keepalive=process_pb2.Keepalive())) is None


def test_error_frame_and_close_code() -> None:
    err = invalid_argument("bad cols")
    assert json.loads(error_frame(err)) == {"type": "error", "code": 3, "message": "bad cols", "details": []}
    assert close_code(grpc.StatusCode.INVALID_ARGUMENT) == 4003
    assert close_code(grpc.StatusCode.UNAVAILABLE) == 4014
