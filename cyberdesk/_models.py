"""Plain data returned by the SDK: frozen dataclasses built from the protobuf messages.

Callers get Python types (bytes, str, datetime) instead of protobuf messages; `raw` keeps the
message where a caller needs a field the dataclass leaves out.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from google.protobuf import timestamp_pb2

    from cyberdesk_proto.v1 import desktop_pb2, filesystem_pb2, instance_pb2, process_pb2


def _time(stamp: timestamp_pb2.Timestamp, present: bool = True) -> _dt.datetime | None:
    if not present or (stamp.seconds == 0 and stamp.nanos == 0):
        return None
    return _dt.datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, tz=_dt.UTC)


# --- processes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The process started (first event of every process stream)."""

    pid: int
    tag: str = ""


@dataclass(frozen=True)
class Stdout:
    """Bytes the process wrote to stdout, exactly as written."""

    data: bytes


@dataclass(frozen=True)
class Stderr:
    """Bytes the process wrote to stderr, exactly as written."""

    data: bytes


@dataclass(frozen=True)
class Exited:
    """The process ended (last event). exit_code is -1 when killed by a signal; 127 for a missing command."""

    exit_code: int
    signal: int = 0
    timed_out: bool = False
    error: str = ""
    # The kernel killed the command (or a process it started) because the instance reached its
    # memory limit; `error` then says so with the limit, `signal` is 9 when the command itself died.
    out_of_memory: bool = False


ExecEvent = Started | Stdout | Stderr | Exited


def event_from_proto(event: process_pb2.ProcessEvent) -> ExecEvent | None:
    """The SDK event for a ProcessEvent; None for keepalives."""
    kind = event.WhichOneof("event")
    if kind == "stdout":
        return Stdout(event.stdout)
    if kind == "stderr":
        return Stderr(event.stderr)
    if kind == "started":
        return Started(event.started.pid, event.started.tag)
    if kind == "exited":
        return exited_from_proto(event.exited)
    return None


def exited_from_proto(exited: process_pb2.ProcessExited) -> Exited:
    """The Exited event of a ProcessExited message."""
    return Exited(exited.exit_code, exited.signal, exited.timed_out, exited.error, exited.out_of_memory)


@dataclass(frozen=True)
class ExecResult:
    """The collected outcome of a command."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    pid: int = 0
    signal: int = 0
    timed_out: bool = False
    error: str = ""
    # Set by exec() when output beyond RunProcess's cap (15 MiB of stdout and stderr together)
    # was dropped by the agent; the streaming path never drops output.
    truncated: bool = False
    # The kernel killed the command (or a process it started) because the instance reached its
    # memory limit (see Exited.out_of_memory).
    out_of_memory: bool = False

    @property
    def ok(self) -> bool:
        """True when the command exited with code 0."""
        return self.exit_code == 0

    @property
    def stdout_text(self) -> str:
        """stdout decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        """stderr decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stderr.decode("utf-8", "replace")


def result_from_run(reply: process_pb2.RunProcessResponse) -> ExecResult:
    """The ExecResult of a RunProcessResponse (pid 0 when the process never started)."""
    ex = exited_from_proto(reply.exited)
    return ExecResult(
        ex.exit_code,
        reply.stdout,
        reply.stderr,
        reply.pid,
        ex.signal,
        ex.timed_out,
        ex.error,
        reply.truncated,
        ex.out_of_memory,
    )


class ResultCollector:
    """Folds a stream of events into an ExecResult."""

    def __init__(self) -> None:
        self.pid = 0
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self.exited: Exited | None = None

    def add(self, event: ExecEvent) -> None:
        """Take one event into account."""
        if isinstance(event, Started):
            self.pid = event.pid
        elif isinstance(event, Stdout):
            self._out.append(event.data)
        elif isinstance(event, Stderr):
            self._err.append(event.data)
        else:
            self.exited = event

    def result(self) -> ExecResult:
        """The result; a stream that ended without an exit event raises Unavailable (never a made-up code)."""
        ex = self.exited
        if ex is None:
            from cyberdesk._errors import Unavailable

            raise Unavailable(f"the output stream of process {self.pid or '?'} ended before the process exited")
        return ExecResult(
            ex.exit_code,
            b"".join(self._out),
            b"".join(self._err),
            self.pid,
            ex.signal,
            ex.timed_out,
            ex.error,
            out_of_memory=ex.out_of_memory,
        )


@dataclass(frozen=True)
class ProcessInfo:
    """A process known to the instance's agent."""

    pid: int
    tag: str
    argv: list[str]
    cwd: str
    pty: bool
    background: bool
    exited: Exited | None

    @classmethod
    def from_proto(cls, info: process_pb2.ProcessInfo) -> ProcessInfo:
        """Build from a ProcessInfo message."""
        exited = exited_from_proto(info.exited) if info.HasField("exited") else None
        return cls(info.pid, info.tag, list(info.argv), info.cwd, info.pty, info.background, exited)


# --- files ---------------------------------------------------------------------------------

FileType = Literal["file", "directory", "symlink", "other", "unknown"]
_FILE_TYPES: dict[int, FileType] = {1: "file", 2: "directory", 3: "symlink", 4: "other"}


@dataclass(frozen=True)
class FileInfo:
    """Metadata of a path inside an instance."""

    path: str
    name: str
    type: FileType
    size: int
    mode: int
    modify_time: _dt.datetime | None
    symlink_target: str = ""

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return self.type == "directory"

    @classmethod
    def from_proto(cls, info: filesystem_pb2.FileInfo) -> FileInfo:
        """Build from a FileInfo message."""
        return cls(
            info.path,
            info.name,
            _FILE_TYPES.get(info.type, "unknown"),
            info.size,
            info.mode,
            _time(info.modify_time, info.HasField("modify_time")),
            info.symlink_target,
        )


FsEventType = Literal["create", "modify", "remove", "rename", "chmod", "unknown"]
_FS_EVENTS: dict[int, FsEventType] = {1: "create", 2: "modify", 3: "remove", 4: "rename", 5: "chmod"}


@dataclass(frozen=True)
class FsEvent:
    """One change below a watched directory."""

    type: FsEventType
    path: str
    old_path: str
    is_directory: bool
    time: _dt.datetime | None

    @classmethod
    def from_proto(cls, event: filesystem_pb2.FilesystemEvent) -> FsEvent:
        """Build from a FilesystemEvent message."""
        return cls(
            _FS_EVENTS.get(event.type, "unknown"),
            event.path,
            event.old_path,
            event.is_directory,
            _time(event.event_time, event.HasField("event_time")),
        )


@dataclass(frozen=True)
class UploadResult:
    """A file written into an instance."""

    path: str
    size: int
    sha256: str


# --- desktop -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Screenshot:
    """An encoded screen image."""

    image: bytes
    format: Literal["png", "jpeg"]
    width: int
    height: int

    def save(self, path: str | Path) -> Path:
        """Write the image to a file and return its path."""
        target = Path(path)
        target.write_bytes(self.image)
        return target


def screenshot_from_proto(reply: desktop_pb2.TakeScreenshotResponse) -> Screenshot:
    """The Screenshot of a TakeScreenshotResponse."""
    from cyberdesk_proto.v1 import desktop_pb2

    fmt: Literal["png", "jpeg"] = "jpeg" if reply.format == desktop_pb2.IMAGE_FORMAT_JPEG else "png"
    return Screenshot(reply.image, fmt, reply.width, reply.height)


# --- instances and snapshots ---------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A saved copy of an instance's files."""

    id: str
    instance_id: str
    create_time: _dt.datetime | None
    size_bytes: int
    template: str
    display_name: str
    includes_memory: bool = False

    @classmethod
    def from_proto(cls, snap: instance_pb2.Snapshot) -> Snapshot:
        """Build from a Snapshot message."""
        return cls(
            snap.snapshot_id,
            snap.instance_id,
            _time(snap.create_time, snap.HasField("create_time")),
            snap.size_bytes,
            snap.template,
            snap.display_name,
            snap.includes_memory,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "snapshot_id": self.id,
            "instance_id": self.instance_id,
            "create_time": self.create_time.isoformat() if self.create_time else None,
            "size_bytes": self.size_bytes,
            "template": self.template,
            "display_name": self.display_name,
            "includes_memory": self.includes_memory,
        }


@dataclass(frozen=True)
class EgressPolicy:
    """Where an INTERNET instance may connect to, as the server stored it (normalised).

    Empty `allow`: every public address; otherwise only those destinations. `deny` wins over
    `allow`. Entries are CIDRs, addresses, host names or "*.example.com" (its subdomains).
    """

    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)

    @classmethod
    def from_proto(cls, policy: instance_pb2.EgressPolicy) -> EgressPolicy:
        """Build from an EgressPolicy message."""
        return cls(list(policy.allow), list(policy.deny))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"allow": list(self.allow), "deny": list(self.deny)}


@dataclass(frozen=True)
class InstanceData:
    """The fields of an instance, as last read from the API."""

    id: str
    state: str
    template: str
    vcpus: int
    memory_mib: int
    state_message: str
    create_time: _dt.datetime | None
    expire_time: _dt.datetime | None
    end_time: _dt.datetime | None
    labels: dict[str, str]
    desktop: bool
    runtime: str
    source_snapshot_id: str
    # Size of the instance's disk (its writable layer) in MiB; 0 until read from the API.
    disk_mib: int = 0
    # Whether the instance has outbound network access (created with internet=True).
    internet: bool = False
    # The egress policy of an INTERNET instance (empty lists: no restriction beyond the platform's).
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    raw: Any = field(repr=False, compare=False, default=None)

    @classmethod
    def from_proto(cls, inst: instance_pb2.Instance) -> InstanceData:
        """Build from an Instance message."""
        from cyberdesk_proto.v1 import instance_pb2

        state = instance_pb2.InstanceState.Name(inst.state).removeprefix("INSTANCE_STATE_")
        return cls(
            inst.instance_id,
            state,
            inst.template,
            inst.vcpus,
            inst.memory_mib,
            inst.state_message,
            _time(inst.create_time, inst.HasField("create_time")),
            _time(inst.expire_time, inst.HasField("expire_time")),
            _time(inst.end_time, inst.HasField("end_time")),
            dict(inst.labels),
            inst.desktop.enabled,
            inst.runtime,
            inst.source_snapshot_id,
            inst.disk_mib,
            inst.network == instance_pb2.NETWORK_MODE_INTERNET,
            EgressPolicy.from_proto(inst.egress),
            inst,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""

        def iso(value: _dt.datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "instance_id": self.id,
            "state": self.state,
            "template": self.template,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "state_message": self.state_message,
            "create_time": iso(self.create_time),
            "expire_time": iso(self.expire_time),
            "end_time": iso(self.end_time),
            "labels": self.labels,
            "desktop": self.desktop,
            "runtime": self.runtime,
            "source_snapshot_id": self.source_snapshot_id,
            "disk_mib": self.disk_mib,
            "internet": self.internet,
            "egress": self.egress.to_dict(),
        }


def instance_started(data: InstanceData) -> InstanceData:
    """The data of a created instance; one that could not start raises Unavailable with the reason."""
    if data.state == "FAILED":
        from cyberdesk._errors import Unavailable

        raise Unavailable(f"instance {data.id} failed to start: {data.state_message or 'no reason given'}")
    return data


def unread_instance(instance_id: str) -> InstanceData:
    """The data of an instance known only by its id (state UNKNOWN until the first call reads it)."""
    return InstanceData(instance_id, "UNKNOWN", "", 0, 0, "", None, None, None, {}, False, "", "")


@dataclass(frozen=True)
class ApiKey:
    """An API key's record (never its secret)."""

    key_id: str
    tenant_id: str
    name: str
    prefix: str
    scopes: list[str]
    create_time: _dt.datetime | None
    revoke_time: _dt.datetime | None

    @classmethod
    def from_proto(cls, key: Any) -> ApiKey:
        """Build from a cyberdesk.internal.v1.ApiKey message."""
        return cls(
            key.key_id,
            key.tenant_id,
            key.name,
            key.prefix,
            list(key.scopes),
            _time(key.create_time, key.HasField("create_time")),
            _time(key.revoke_time, key.HasField("revoke_time")),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "key_id": self.key_id,
            "tenant_id": self.tenant_id,
            "name": self.name,
            "prefix": self.prefix,
            "scopes": self.scopes,
            "create_time": self.create_time.isoformat() if self.create_time else None,
            "revoke_time": self.revoke_time.isoformat() if self.revoke_time else None,
        }


# --- previews of ports ---------------------------------------------------------------------


@dataclass(frozen=True)
class PreviewLink:
    """Links to a port inside an instance, and the signed token that opens them until `expire_time`.

    `url` is the host form (`http://3000-i-abc.localhost:8080/`), `path_url` the path form under
    the gateway's own origin. For a public link both carry the token; otherwise send `token` in an
    `x-cyberdesk-preview-token` header (or the API key as usual).
    """

    url: str
    path_url: str
    token: str
    expire_time: _dt.datetime | None
    public: bool

    @classmethod
    def from_proto(cls, reply: Any, public: bool) -> PreviewLink:
        """Build from a CreatePreviewUrlResponse."""
        return cls(
            reply.url, reply.path_url, reply.token, _time(reply.expire_time, reply.HasField("expire_time")), public
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "url": self.url,
            "path_url": self.path_url,
            "token": self.token,
            "expire_time": self.expire_time.isoformat() if self.expire_time else None,
            "public": self.public,
        }


# --- the live desktop ----------------------------------------------------------------------


@dataclass(frozen=True)
class DesktopViewerLink:
    """A link to an instance's live desktop, and the signed token in it, valid until `expire_time`.

    `url` is the viewer page (`<gateway>/desktop/<instance>#token=...`: open it in a browser);
    `stream_url` the WebSocket of the stream itself (RFB, for a VNC client of one's own: offer the
    subprotocols `binary` and `cyberdesk.viewer.<token>`). A `view_only` link's input is dropped
    by the gateway.
    """

    url: str
    stream_url: str
    token: str
    expire_time: _dt.datetime | None
    view_only: bool

    @classmethod
    def from_proto(cls, reply: Any) -> DesktopViewerLink:
        """Build from a CreateDesktopViewerUrlResponse."""
        expires = _time(reply.expire_time, reply.HasField("expire_time"))
        return cls(reply.url, reply.stream_url, reply.token, expires, reply.view_only)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "url": self.url,
            "stream_url": self.stream_url,
            "token": self.token,
            "expire_time": self.expire_time.isoformat() if self.expire_time else None,
            "view_only": self.view_only,
        }


# --- usage and plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """Metered quantities (whole seconds or unit-seconds; the rounding rule is in docs/billing.md).

    Compute is billed while RUNNING; a PAUSED instance pays only for its disk.
    """

    instance_seconds: int
    vcpu_seconds: int
    memory_mib_seconds: int
    desktop_seconds: int
    paused_seconds: int
    disk_mib_seconds: int
    paused_disk_mib_seconds: int

    @property
    def memory_gib_seconds(self) -> float:
        """Memory GiB-seconds."""
        return self.memory_mib_seconds / 1024

    @property
    def disk_gib_seconds(self) -> float:
        """Disk GiB-seconds."""
        return self.disk_mib_seconds / 1024

    @classmethod
    def from_proto(cls, msg: Any) -> Usage:
        """Build from a cyberdesk.v1.Usage message."""
        return cls(
            msg.instance_seconds,
            msg.vcpu_seconds,
            msg.memory_mib_seconds,
            msg.desktop_seconds,
            msg.paused_seconds,
            msg.disk_mib_seconds,
            msg.paused_disk_mib_seconds,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "instance_seconds": self.instance_seconds,
            "vcpu_seconds": self.vcpu_seconds,
            "memory_mib_seconds": self.memory_mib_seconds,
            "memory_gib_seconds": self.memory_gib_seconds,
            "desktop_seconds": self.desktop_seconds,
            "paused_seconds": self.paused_seconds,
            "disk_mib_seconds": self.disk_mib_seconds,
            "disk_gib_seconds": self.disk_gib_seconds,
            "paused_disk_mib_seconds": self.paused_disk_mib_seconds,
        }


_STATE_NAMES = {
    1: "PENDING",
    2: "STARTING",
    3: "RUNNING",
    4: "PAUSED",
    5: "STOPPING",
    6: "TERMINATED",
    7: "FAILED",
}


@dataclass(frozen=True)
class InstanceUsage:
    """One instance's usage in the period; `open`: still accruing (counted up to `as_of`)."""

    instance_id: str
    template: str
    vcpus: int
    memory_mib: int
    disk_mib: int
    desktop: bool
    state: str
    open: bool
    usage: Usage

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "instance_id": self.instance_id,
            "template": self.template,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "disk_mib": self.disk_mib,
            "desktop": self.desktop,
            "state": self.state,
            "open": self.open,
            "usage": self.usage.to_dict(),
        }


@dataclass(frozen=True)
class UsageReport:
    """The tenant's usage in [start_time, end_time): in total and by instance (newest first)."""

    start_time: _dt.datetime | None
    end_time: _dt.datetime | None
    as_of: _dt.datetime | None
    total: Usage
    instances: list[InstanceUsage]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "start_time": self.start_time.isoformat() if self.start_time else None,
            "end_time": self.end_time.isoformat() if self.end_time else None,
            "as_of": self.as_of.isoformat() if self.as_of else None,
            "total": self.total.to_dict(),
            "instances": [i.to_dict() for i in self.instances],
        }


def instance_usage_from_proto(msg: Any) -> InstanceUsage:
    """Build from a cyberdesk.v1.InstanceUsage message."""
    return InstanceUsage(
        msg.instance_id,
        msg.template,
        msg.vcpus,
        msg.memory_mib,
        msg.disk_mib,
        msg.desktop,
        _STATE_NAMES.get(msg.state, "UNKNOWN"),
        msg.open,
        Usage.from_proto(msg.usage),
    )


_CREDIT_POLICIES = {0: "pause", 1: "pause", 2: "terminate", 3: "refuse_new"}


@dataclass(frozen=True)
class Plan:
    """The tenant's plan: its limits and how much of each is used now (`used_*`).

    `monthly_instance_seconds` 0 means unlimited; `credit_policy` is what happens to running
    instances once the month's allowance is used up, after `credit_grace_seconds`.
    """

    name: str
    max_instances: int
    max_vcpus: int
    max_memory_mib: int
    max_disk_mib: int
    monthly_instance_seconds: int
    max_timeout_seconds: int
    desktops_allowed: bool
    credit_policy: str
    credit_grace_seconds: int
    used_instances: int
    used_vcpus: int
    used_memory_mib: int
    used_disk_mib: int
    used_desktops: int
    used_monthly_instance_seconds: int
    period_start_time: _dt.datetime | None
    credits_exhausted_time: _dt.datetime | None

    @classmethod
    def from_proto(cls, reply: Any) -> Plan:
        """Build from a cyberdesk.v1.GetPlanResponse."""
        plan, used = reply.plan, reply.used
        return cls(
            plan.name,
            plan.max_instances,
            plan.max_vcpus,
            plan.max_memory_mib,
            plan.max_disk_mib,
            plan.monthly_instance_seconds,
            plan.max_timeout.seconds,
            plan.desktops_allowed,
            _CREDIT_POLICIES.get(plan.credit_policy, "pause"),
            plan.credit_grace.seconds,
            used.instances,
            used.vcpus,
            used.memory_mib,
            used.disk_mib,
            used.desktops,
            used.monthly_instance_seconds,
            _time(reply.period_start_time, reply.HasField("period_start_time")),
            _time(used.credits_exhausted_time, used.HasField("credits_exhausted_time")),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, _dt.datetime) else value
        return out


def usage_report(pages: list[Any]) -> UsageReport:
    """One report from the pages of GetUsage (the total and period are the same on every page)."""
    first = pages[0]
    return UsageReport(
        _time(first.start_time, first.HasField("start_time")),
        _time(first.end_time, first.HasField("end_time")),
        _time(first.as_of, first.HasField("as_of")),
        Usage.from_proto(first.total),
        [instance_usage_from_proto(i) for page in pages for i in page.instances],
    )
