"""Request builders shared by the sync and async clients (pure: no I/O), so both send the same bytes."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from typing import Literal

from google.protobuf import duration_pb2, timestamp_pb2

from cyberdesk._errors import InvalidArgument
from cyberdesk_proto.v1 import billing_pb2, desktop_pb2, filesystem_pb2, instance_pb2, process_pb2

Command = str | Sequence[str]
Button = Literal["left", "middle", "right"]
Direction = Literal["up", "down", "left", "right"]

CHUNK = 1024 * 1024  # upload chunk: well under gRPC's 4 MiB default message limit
MAX_MESSAGE = 64 * 1024 * 1024
# What RunProcess keeps of stdout and stderr together (the agent's default and maximum, see
# proto/cyberdesk/v1/process.proto): the reply must fit the 16 MiB message limit of the agent and
# the gateway. Beyond it the agent reads and drops the output and sets `truncated`.
MAX_RUN_OUTPUT = 15 * 1024 * 1024

STATES = ("PENDING", "STARTING", "RUNNING", "PAUSED", "STOPPING", "TERMINATED", "FAILED")

SIGNALS: dict[str, int] = {
    "HUP": 1,
    "INT": 2,
    "QUIT": 3,
    "KILL": 9,
    "USR1": 10,
    "USR2": 12,
    "TERM": 15,
    "CONT": 18,
    "STOP": 19,
    "TSTP": 20,
}


def duration(seconds: float, what: str) -> duration_pb2.Duration:
    """A Duration; a negative or non-finite value is refused before it reaches the server."""
    if not seconds >= 0 or seconds == float("inf"):
        raise InvalidArgument(f"{what} must be a non-negative number of seconds, not {seconds!r}")
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def signal_number(sig: int | str) -> int:
    """The proto Signal value of a name ("TERM", "SIGTERM") or number."""
    if isinstance(sig, int):
        if sig not in SIGNALS.values():
            raise InvalidArgument(f"signal {sig} is not one of {sorted(SIGNALS.values())}")
        return sig
    name = sig.upper().removeprefix("SIG")
    if name not in SIGNALS:
        raise InvalidArgument(f"unknown signal {sig!r}; known: {', '.join(sorted(SIGNALS))}")
    return SIGNALS[name]


def selector(pid: int | None, tag: str | None) -> process_pb2.ProcessSelector:
    """A ProcessSelector naming exactly one of pid or tag."""
    if (pid is None) == (tag is None):
        raise InvalidArgument("name the process by exactly one of pid or tag")
    return process_pb2.ProcessSelector(pid=pid) if pid is not None else process_pb2.ProcessSelector(tag=tag or "")


def start_request(
    instance_id: str,
    command: Command,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: bytes | str | None = None,
    keep_stdin_open: bool = False,
    timeout: float | None = None,
    tag: str | None = None,
    background: bool = False,
) -> process_pb2.StartProcessRequest:
    """StartProcessRequest: a string is a shell command line (`bash -lc`), a sequence is argv."""
    request = process_pb2.StartProcessRequest(
        instance_id=instance_id,
        env=dict(env or {}),
        cwd=cwd or "",
        keep_stdin_open=keep_stdin_open,
        tag=tag or "",
        background=background,
    )
    _command_fields(request, command, stdin, timeout)
    return request


def run_request(
    instance_id: str,
    command: Command,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: bytes | str | None = None,
    timeout: float | None = None,
) -> process_pb2.RunProcessRequest:
    """RunProcessRequest (run to completion, output capped by the agent at MAX_RUN_OUTPUT bytes)."""
    request = process_pb2.RunProcessRequest(instance_id=instance_id, env=dict(env or {}), cwd=cwd or "")
    _command_fields(request, command, stdin, timeout)
    return request


def _command_fields(
    request: process_pb2.StartProcessRequest | process_pb2.RunProcessRequest,
    command: Command,
    stdin: bytes | str | None,
    timeout: float | None,
) -> None:
    """Fill command or argv, stdin and timeout, which both requests carry under the same names."""
    if isinstance(command, str):
        if not command:
            raise InvalidArgument("command is empty")
        request.command = command
    else:
        argv = list(command)
        if not argv:
            raise InvalidArgument("argv is empty")
        request.argv.extend(argv)
    if stdin is not None:
        request.stdin = stdin.encode() if isinstance(stdin, str) else stdin
    if timeout is not None:
        request.timeout.CopyFrom(duration(timeout, "timeout"))


def state_filter(states: list[str] | None) -> list[instance_pb2.InstanceState.ValueType]:
    """InstanceState values of state names (case-insensitive)."""
    values: list[instance_pb2.InstanceState.ValueType] = []
    for name in states or []:
        upper = name.upper()
        if upper not in STATES:
            raise InvalidArgument(f"unknown state {name!r}; known: {', '.join(STATES)}")
        values.append(instance_pb2.InstanceState.Value("INSTANCE_STATE_" + upper))
    return values


def upload_header(
    path: str,
    *,
    overwrite: bool,
    create_parents: bool,
    mode: int | None,
    expected_sha256: str = "",
    upload_id: str = "",
    offset: int = 0,
) -> filesystem_pb2.UploadFileHeader:
    """The UploadFileHeader for a destination path (a named one resumes from `offset`)."""
    if not path.startswith("/"):
        raise InvalidArgument(f"remote path {path!r} must be absolute (start with /)")
    return filesystem_pb2.UploadFileHeader(
        path=path,
        mode=mode or 0,
        overwrite=overwrite,
        create_parents=create_parents,
        expected_sha256=expected_sha256,
        upload_id=upload_id,
        offset=offset,
    )


def upload_trailer(size: int, sha256: str) -> filesystem_pb2.UploadFileRequest:
    """The last message of an upload: without it the instance commits nothing."""
    return filesystem_pb2.UploadFileRequest(trailer=filesystem_pb2.UploadFileTrailer(size=size, sha256=sha256))


def create_request(
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
    disk_mib: int = 0,
    allow: Sequence[str] | None = None,
    deny: Sequence[str] | None = None,
) -> instance_pb2.CreateInstanceRequest:
    """CreateInstanceRequest with the server's defaults wherever an argument is left out.

    `allow` and `deny` (CIDRs, addresses, host names, "*.example.com") are the egress policy of
    an instance with `internet=True`; given without it they are refused here, since the server
    would store them and they would do nothing. The server checks each entry.
    """
    allowed, denied = _entries(allow, "allow"), _entries(deny, "deny")
    if (allowed or denied) and not internet:
        given = "allow and deny need" if allowed and denied else ("allow needs" if allowed else "deny needs")
        raise InvalidArgument(
            f"{given} internet=True (--internet in the CLI): an instance without it has no network at all, "
            "so there is nothing to narrow"
        )
    if disk_mib < 0:
        raise InvalidArgument(f"disk_mib must be a positive number of MiB (or 0 for the default), not {disk_mib}")
    request = instance_pb2.CreateInstanceRequest(
        template=template,
        vcpus=vcpus,
        memory_mib=memory_mib,
        env=dict(env or {}),
        labels=dict(labels or {}),
        desktop=instance_pb2.DesktopConfig(enabled=desktop, width=width, height=height),
        network=instance_pb2.NETWORK_MODE_INTERNET if internet else instance_pb2.NETWORK_MODE_NONE,
        snapshot_id=snapshot_id or "",
        request_id=request_id or "",
        timeout_action=instance_pb2.TIMEOUT_ACTION_PAUSE if pause_on_timeout else instance_pb2.TIMEOUT_ACTION_TERMINATE,
        disk_mib=disk_mib,
        egress=instance_pb2.EgressPolicy(allow=allowed, deny=denied),
    )
    if timeout is not None:
        request.timeout.CopyFrom(duration(timeout, "timeout"))
    return request


def _entries(values: Sequence[str] | None, what: str) -> list[str]:
    """The entries of an allow or deny list; a lone string is one entry, never its characters."""
    if values is None:
        return []
    entries = [values] if isinstance(values, str) else list(values)
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise InvalidArgument(f"{what}: {entry!r} is not a CIDR, an address or a host name")
    return entries


def pty_open(
    instance_id: str,
    *,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    cols: int = 80,
    rows: int = 24,
    tag: str | None = None,
    background: bool = False,
) -> process_pb2.ConnectPtyRequest:
    """The first message of ConnectPty: open a new terminal."""
    return process_pb2.ConnectPtyRequest(
        instance_id=instance_id,
        open=process_pb2.PtyOpen(
            argv=list(argv or []),
            env=dict(env or {}),
            cwd=cwd or "",
            size=process_pb2.PtySize(cols=cols, rows=rows),
            tag=tag or "",
            background=background,
        ),
    )


_BUTTONS = {
    "left": desktop_pb2.MOUSE_BUTTON_LEFT,
    "middle": desktop_pb2.MOUSE_BUTTON_MIDDLE,
    "right": desktop_pb2.MOUSE_BUTTON_RIGHT,
}
_DIRECTIONS = {
    "up": desktop_pb2.SCROLL_DIRECTION_UP,
    "down": desktop_pb2.SCROLL_DIRECTION_DOWN,
    "left": desktop_pb2.SCROLL_DIRECTION_LEFT,
    "right": desktop_pb2.SCROLL_DIRECTION_RIGHT,
}


def button(name: str) -> desktop_pb2.MouseButton.ValueType:
    """The MouseButton of "left", "middle" or "right"."""
    if name not in _BUTTONS:
        raise InvalidArgument(f"unknown mouse button {name!r}; use left, middle or right")
    return _BUTTONS[name]


def direction(name: str) -> desktop_pb2.ScrollDirection.ValueType:
    """The ScrollDirection of "up", "down", "left" or "right"."""
    if name not in _DIRECTIONS:
        raise InvalidArgument(f"unknown scroll direction {name!r}; use up, down, left or right")
    return _DIRECTIONS[name]


def point(x: int | None, y: int | None) -> desktop_pb2.Point | None:
    """A Point, or None when neither coordinate is given."""
    if x is None and y is None:
        return None
    if x is None or y is None:
        raise InvalidArgument("give both x and y, or neither")
    return desktop_pb2.Point(x=x, y=y)


def screenshot_request(
    instance_id: str,
    *,
    format: Literal["png", "jpeg"] = "png",
    quality: int = 0,
    region: tuple[int, int, int, int] | None = None,
    scale: float = 0.0,
) -> desktop_pb2.TakeScreenshotRequest:
    """TakeScreenshotRequest; region is (x, y, width, height)."""
    if format not in ("png", "jpeg"):
        raise InvalidArgument(f"unknown image format {format!r}; use png or jpeg")
    request = desktop_pb2.TakeScreenshotRequest(
        instance_id=instance_id,
        format=desktop_pb2.IMAGE_FORMAT_PNG if format == "png" else desktop_pb2.IMAGE_FORMAT_JPEG,
        quality=quality,
        scale=scale,
    )
    if region is not None:
        x, y, w, h = region
        request.region.CopyFrom(desktop_pb2.Region(x=x, y=y, width=w, height=h))
    return request


def _timestamp(when: _dt.datetime, what: str) -> timestamp_pb2.Timestamp:
    if not isinstance(when, _dt.datetime):
        raise InvalidArgument(f"{what} must be a datetime, got {type(when).__name__}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)  # naive: UTC, never the local zone
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when.astimezone(_dt.UTC))
    return stamp


def usage_request(
    since: _dt.datetime | None, until: _dt.datetime | None, instance_id: str, page_token: str
) -> billing_pb2.GetUsageRequest:
    """A GetUsage request for [since, until) (server defaults: the month so far) of one instance or all."""
    request = billing_pb2.GetUsageRequest(instance_id=instance_id, page_size=1000, page_token=page_token)
    if since is not None:
        request.start_time.CopyFrom(_timestamp(since, "since"))
    if until is not None:
        request.end_time.CopyFrom(_timestamp(until, "until"))
    return request
