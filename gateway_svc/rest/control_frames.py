"""The JSON control frames of the WebSocket PTY (pure): client frames in, server frames out.

Binary frames are terminal bytes and never pass through here. Text frames are JSON objects with
a `"type"`:

- client, first: `open` (`cols`, `rows`, `argv`, `env`, `cwd`, `tag`, `background`, all optional)
  or `attach` (exactly one of `pid` and `tag`);
- client, later: `resize` (`cols`, `rows`), `signal` (`signal`: a name of cyberdesk.v1.Signal
  with or without `SIGNAL_`, any case, or its number) and `detach` (leave the terminal: the server
  closes the socket with 1000 "detached" once every frame sent before it was applied);
- server: `started` first, `exit` last, `error` (a google.rpc.Status) when something failed.

A frame that breaks these rules is INVALID_ARGUMENT naming what is wrong (an unknown field, a
wrong type, a type not allowed at this point), so the relay can report it in an `error` frame.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import grpc

from cyberdesk_common.status import RpcError, invalid_argument
from cyberdesk_proto.v1 import process_pb2
from gateway_svc.rest import http_errors, json_mapping

# Signal names without their SIGNAL_ prefix, e.g. "SIGINT" -> 2; SIGNAL_UNSPECIFIED is no signal.
SIGNALS: dict[str, int] = {
    name.removeprefix("SIGNAL_"): number for name, number in process_pb2.Signal.items() if number
}
FIRST_FRAME_TYPES = frozenset({"open", "attach"})
LATER_FRAME_TYPES = frozenset({"resize", "signal", "detach"})
ERROR_CLOSE_BASE = 4000  # WebSocket close code of a failed call: 4000 + its gRPC code


def parse_control_frame(text: str, first: bool) -> process_pb2.ConnectPtyRequest:
    """The ConnectPtyRequest a client's JSON control frame asks for; INVALID_ARGUMENT naming what is wrong.

    `first` says whether this is the frame that opens the call (`open`/`attach`) or a later one
    (`resize`/`signal`).
    """
    try:
        frame = json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid_argument(f"control frame is not valid JSON: {exc.msg}") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise invalid_argument('a control frame is a JSON object with a "type"')
    kind = frame["type"]
    allowed = FIRST_FRAME_TYPES if first else LATER_FRAME_TYPES
    if kind not in allowed:
        raise invalid_argument(f"control frame type {kind!r} is not allowed here; expected one of {sorted(allowed)}")
    request = process_pb2.ConnectPtyRequest()
    try:
        if kind == "open":
            known = {"type", "cols", "rows", "argv", "env", "cwd", "tag", "background"}
            _no_unknown(frame, known)
            opened = process_pb2.PtyOpen(
                argv=[str(a) for a in _list(frame, "argv")],
                env={str(k): str(v) for k, v in _dict(frame, "env").items()},
                cwd=str(frame.get("cwd", "")),
                size=process_pb2.PtySize(cols=_uint(frame, "cols"), rows=_uint(frame, "rows")),
                tag=str(frame.get("tag", "")),
                background=bool(frame.get("background", False)),
            )
            request.open.CopyFrom(opened)
        elif kind == "attach":
            _no_unknown(frame, {"type", "pid", "tag"})
            if ("pid" in frame) == ("tag" in frame):
                raise invalid_argument('attach needs exactly one of "pid" and "tag"')
            if "pid" in frame:
                request.attach.selector.pid = _uint(frame, "pid")
            else:
                request.attach.selector.tag = str(frame["tag"])
        elif kind == "resize":
            _no_unknown(frame, {"type", "cols", "rows"})
            request.resize.CopyFrom(process_pb2.PtySize(cols=_uint(frame, "cols"), rows=_uint(frame, "rows")))
        elif kind == "detach":
            _no_unknown(frame, {"type"})
            request.detach.SetInParent()
        else:
            _no_unknown(frame, {"type", "signal"})
            name = frame.get("signal")
            if isinstance(name, int) and not isinstance(name, bool) and name in SIGNALS.values():
                request.signal = name  # type: ignore[assignment]
            elif isinstance(name, str) and name.upper().removeprefix("SIGNAL_") in SIGNALS:
                request.signal = SIGNALS[name.upper().removeprefix("SIGNAL_")]  # type: ignore[assignment]
            else:
                raise invalid_argument(f"signal {name!r} is not one of {', '.join(SIGNALS)} (or their numbers)")
    except (TypeError, ValueError) as exc:
        raise invalid_argument(f"control frame {kind!r}: {exc}") from None
    return request


def server_frame(reply: process_pb2.ConnectPtyResponse) -> bytes | str | None:
    """What one ConnectPty response becomes: terminal bytes (a binary frame), a JSON text frame, or None.

    Keepalives become nothing: WebSocket has its own pings.
    """
    kind = reply.WhichOneof("event")
    if kind == "output":
        return bytes(reply.output)
    if kind == "started":
        return encode({"type": "started", **json_mapping.message_to_json_value(reply.started)})
    if kind == "exited":
        return encode({"type": "exit", **json_mapping.message_to_json_value(reply.exited)})
    return None


def error_frame(err: RpcError) -> str:
    """The `error` frame of a failure: the google.rpc.Status fields beside `"type": "error"`."""
    return encode({"type": "error", **http_errors.status_body(err.code, err.message, err.details)})


def close_code(code: grpc.StatusCode) -> int:
    """The WebSocket close code after a failed call, e.g. 4003 for INVALID_ARGUMENT, 4014 for UNAVAILABLE."""
    return ERROR_CLOSE_BASE + int(code.value[0])


def encode(frame: Mapping[str, Any]) -> str:
    """A server frame as compact JSON text."""
    return json.dumps(frame, separators=(",", ":"))


def _no_unknown(frame: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(frame) - known)
    if unknown:
        raise invalid_argument(f"control frame {frame['type']!r}: unknown field {unknown[0]!r}")


def _uint(frame: Mapping[str, Any], name: str) -> int:
    value = frame.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise invalid_argument(f"control frame {frame['type']!r}: {name} must be a non-negative integer")
    return value


def _list(frame: Mapping[str, Any], name: str) -> list[Any]:
    value = frame.get(name, [])
    if not isinstance(value, list):
        raise invalid_argument(f"control frame {frame['type']!r}: {name} must be a list")
    return value


def _dict(frame: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = frame.get(name, {})
    if not isinstance(value, dict):
        raise invalid_argument(f"control frame {frame['type']!r}: {name} must be an object")
    return value
