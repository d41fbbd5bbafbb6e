"""`cyberdesk`: argument parsing and one function per command.

Every failure ends as one line on stderr and a non-zero exit code, never a traceback: API errors
(CyberdeskError), local file errors (OSError) and anything unexpected are caught in `main`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import posixpath
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cyberdesk._errors import ConfigurationError, CyberdeskError, InvalidArgument, NotFound, Unavailable
from cyberdesk.cli._output import ProgressBar, emit_json, human_size, table

EXIT_TIMED_OUT = 124  # as timeout(1)
_REMOTE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*):(.*)$")


class UsageError(Exception):
    """Bad command-line input the parser cannot see (exit code 2)."""


def _client(args: argparse.Namespace) -> Any:
    from cyberdesk._sync.client import Cyberdesk

    return Cyberdesk(api_key=args.api_key, endpoint=args.endpoint)


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} {item!r} is not KEY=VALUE")
        result[key] = value
    return result


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


# --- up ------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    try:
        from cyberdesk_stack.launcher import StackOptions, run
    except ImportError:
        raise UsageError(
            "the local stack is part of the server distribution, which is not installed here: "
            "in a checkout of the repository, `make run` sets it up"
        ) from None

    opts = StackOptions.from_env()
    names = ("gateway_addr", "http_addr", "instance_addr", "billing_addr", "redis_port", "warm_pool", "on_exit")
    for name in (*names, "runtime"):
        value = getattr(args, name)
        if value is not None:
            setattr(opts, name, value)
    if args.state_dir:
        opts.state_dir = Path(args.state_dir).expanduser().resolve()
    opts.write_config = not args.no_config
    return run(opts)


# --- instances -----------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    with _client(args) as client:
        inst = client.instances.create(
            args.template,
            timeout=args.timeout,
            desktop=args.desktop,
            width=args.width or 0,
            height=args.height or 0,
            vcpus=args.vcpus or 0,
            memory_mib=args.memory or 0,
            env=_pairs(args.env, "--env"),
            labels=_pairs(args.label, "--label"),
            internet=args.internet,
            snapshot_id=args.snapshot,
            disk_mib=args.disk or 0,
            allow=args.allow,
            deny=args.deny,
        )
        if args.json:
            emit_json(inst.data.to_dict())
        else:
            print(inst.id)
    return 0


def _instance_rows(instances: list[Any]) -> list[list[str]]:
    return [
        [
            i.id,
            i.state,
            i.data.template,
            "yes" if i.data.desktop else "no",
            _when(i.data.create_time),
            _when(i.data.expire_time),
        ]
        for i in instances
    ]


def cmd_list(args: argparse.Namespace) -> int:
    states = args.state or (None if args.all else ["PENDING", "STARTING", "RUNNING", "PAUSED", "STOPPING"])
    with _client(args) as client:
        instances = client.instances.list(states=states, labels=_pairs(args.label, "--label"))
    if args.json:
        emit_json([i.data.to_dict() for i in instances])
    elif instances:
        table(_instance_rows(instances), ["ID", "STATE", "TEMPLATE", "DESKTOP", "CREATED", "EXPIRES"])
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        inst = client.instances.get(args.id)
    if args.json:
        emit_json(inst.data.to_dict())
    else:
        for key, value in inst.data.to_dict().items():
            print(f"{key:<19} {value if value not in (None, '', {}) else '-'}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    failed = 0
    with _client(args) as client:
        for instance_id in args.ids:
            try:
                client.instances.delete(instance_id)
                print(instance_id)
            except CyberdeskError as err:
                print(f"cyberdesk: {instance_id}: {err}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


def cmd_timeout(args: argparse.Namespace) -> int:
    with _client(args) as client:
        inst = client.instances.handle(args.id).set_timeout(args.seconds)
    print(f"{inst.id} expires {_when(inst.data.expire_time)} UTC")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    with _client(args) as client:
        inst = client.instances.handle(args.id)
        (inst.pause() if args.command == "pause" else inst.resume())
    print(f"{inst.id} {inst.state}")
    return 0


# --- processes -----------------------------------------------------------------------------


def cmd_exec(args: argparse.Namespace) -> int:
    from cyberdesk._models import Exited, Stderr, Stdout

    command: str | list[str]
    argv = list(args.cmd)
    if not argv:
        raise UsageError("no command: cyberdesk exec ID -- CMD [ARG...]")
    # One argument is a shell command line (`exec ID -- 'make && ./run'`); several are an argv.
    command = argv[0] if len(argv) == 1 else argv
    stdin = sys.stdin.buffer.read() if args.stdin else None
    out, err = sys.stdout.buffer, sys.stderr.buffer
    with _client(args) as client:
        # A handle from the id, not GetInstance: the exec call itself says NOT_FOUND (or why not).
        inst = client.instances.handle(args.id)
        exited: Exited | None = None
        for event in inst.exec_stream(
            command, timeout=args.timeout, cwd=args.cwd, env=_pairs(args.env, "--env"), stdin=stdin
        ):
            if isinstance(event, Stdout):
                out.write(event.data)
                out.flush()
            elif isinstance(event, Stderr):
                err.write(event.data)
                err.flush()
            elif isinstance(event, Exited):
                exited = event
    if exited is None:
        print("cyberdesk: the stream ended before the command exited", file=sys.stderr)
        return 1
    if exited.timed_out:
        print(f"cyberdesk: command killed after its timeout of {args.timeout} s", file=sys.stderr)
        return EXIT_TIMED_OUT
    if exited.out_of_memory:
        # One line whatever the agent's wording: the reason a bare "Killed" or 137 would not give.
        reason = exited.error if exited.error.startswith("out of memory") else "out of memory: killed by the kernel"
        print(f"cyberdesk: {reason}", file=sys.stderr)
    elif exited.error and exited.exit_code != 0:
        print(f"cyberdesk: {exited.error}", file=sys.stderr)
    if exited.signal:
        return 128 + exited.signal
    return exited.exit_code if 0 <= exited.exit_code <= 255 else 1


def cmd_shell(args: argparse.Namespace) -> int:
    from cyberdesk.cli._terminal import run_shell

    argv = list(args.cmd) or None
    with _client(args) as client:
        return run_shell(client.instances.handle(args.id), argv)


# --- files ---------------------------------------------------------------------------------


def _split_remote(spec: str) -> tuple[str, str] | None:
    """(instance_id, path) for ID:PATH, None for a local path."""
    if os.sep in spec.split(":", 1)[0]:
        return None
    found = _REMOTE.match(spec)
    if found is None:
        return None
    instance_id, path = found.groups()
    if not path.startswith("/"):
        raise UsageError(f"{spec}: the path inside the instance must be absolute (ID:/path)")
    return instance_id, path


def cmd_cp(args: argparse.Namespace) -> int:
    src, dst = _split_remote(args.src), _split_remote(args.dst)
    if (src is None) == (dst is None):
        raise UsageError("cp copies between this machine and an instance: one of SRC and DST must be ID:/PATH")
    with _client(args) as client:
        if dst is not None:
            local = Path(args.src)
            if local.is_dir():
                raise UsageError(f"{local} is a directory; cp copies single files")
            if not local.exists():
                raise UsageError(f"{local}: no such file")
            files = client.instances.handle(dst[0]).files
            target = dst[1]
            if target.endswith("/") or _is_remote_dir(files, target):
                target = posixpath.join(target, local.name)
            bar = ProgressBar(f"{local.name} ->")
            try:
                with _notes(bar):
                    result = files.upload(local, target, progress=bar)
            finally:
                bar.finish()
            if not args.quiet:
                print(f"{result.path}  {human_size(result.size)}  sha256 {result.sha256}")
        else:
            assert src is not None
            files = client.instances.handle(src[0]).files
            dest = Path(args.dst)
            if dest.is_dir():
                dest = dest / posixpath.basename(src[1].rstrip("/"))
            bar = ProgressBar(f"-> {dest.name}")
            digest = hashlib.sha256()
            try:
                with _notes(bar):
                    count = files.download(src[1], dest, progress=bar)
            finally:
                bar.finish()
            if not args.quiet:
                with open(dest, "rb") as got:
                    digest = hashlib.file_digest(got, "sha256")
                print(f"{dest}  {human_size(count)}  sha256 {digest.hexdigest()}")
    return 0


class _BarNotes(logging.Handler):
    """The SDK's transfer warnings (an interruption, a resume) as lines above the progress bar."""

    def __init__(self, bar: ProgressBar) -> None:
        super().__init__(logging.WARNING)
        self._bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        self._bar.note(record.getMessage())


@contextmanager
def _notes(bar: ProgressBar) -> Iterator[None]:
    """Show the SDK's transfer warnings while the block runs: a resumed transfer says so and from where."""
    logger = logging.getLogger("cyberdesk.files")
    handler = _BarNotes(bar)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _is_remote_dir(files: Any, path: str) -> bool:
    try:
        return bool(files.stat(path).is_dir)
    except NotFound:
        return False


def cmd_ls(args: argparse.Namespace) -> int:
    remote = _split_remote(args.target)
    if remote is None:
        if _REMOTE.match(args.target) is None and ":" not in args.target:
            remote = (args.target, "/")
        else:
            raise UsageError(f"{args.target}: expected ID:/PATH")
    with _client(args) as client:
        files = client.instances.handle(remote[0]).files
        info = files.stat(remote[1])
        entries = files.list(remote[1], depth=args.depth) if info.is_dir else [info]
    if args.json:
        emit_json(
            [
                {
                    "path": e.path,
                    "name": e.name,
                    "type": e.type,
                    "size": e.size,
                    "mode": oct(e.mode),
                    "modify_time": e.modify_time.isoformat() if e.modify_time else None,
                    "symlink_target": e.symlink_target,
                }
                for e in entries
            ]
        )
        return 0
    for e in entries:
        name = posixpath.relpath(e.path, remote[1]) if info.is_dir else e.name
        suffix = "/" if e.is_dir else (f" -> {e.symlink_target}" if e.symlink_target else "")
        if args.long:
            print(f"{_mode_string(e.type, e.mode)} {e.size:>12} {_when(e.modify_time)}  {name}{suffix}")
        else:
            print(f"{name}{suffix}")
    return 0


def _mode_string(kind: str, mode: int) -> str:
    first = {"directory": "d", "symlink": "l", "file": "-"}.get(kind, "?")
    bits = "".join(ch if mode & (1 << (8 - i)) else "-" for i, ch in enumerate("rwxrwxrwx"))
    return first + bits


# --- desktop and snapshots -----------------------------------------------------------------


def cmd_screenshot(args: argparse.Namespace) -> int:
    fmt = "jpeg" if args.output.lower().endswith((".jpg", ".jpeg")) else "png"
    with _client(args) as client:
        shot = client.instances.handle(args.id).desktop.screenshot(format=fmt, scale=args.scale or 0.0)
    shot.save(args.output)
    print(f"{args.output}  {shot.width}x{shot.height} {shot.format}  {human_size(len(shot.image))}")
    return 0


def cmd_port(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise UsageError(f"port must be 1 to 65535, not {args.port}")
    with _client(args) as client:
        link = client.instances.handle(args.id).ports.link(args.port, public=args.signed, ttl=args.ttl)
    if args.json:
        emit_json(link.to_dict())
    else:
        print(link.path_url if args.path else link.url)
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    with _client(args) as client:
        link = client.instances.handle(args.id).desktop.viewer_link(view_only=args.view_only, ttl=args.ttl)
    if args.json:
        emit_json(link.to_dict())
        return 0
    if not args.print:
        import webbrowser

        # webbrowser tries xdg-open and the browsers it knows; without any (a server), print instead.
        if webbrowser.open(link.url):
            mode = "view-only " if args.view_only else ""
            print(f"opened the {mode}viewer of {args.id} in a browser", file=sys.stderr)
            return 0
        print("no browser to open; the link:", file=sys.stderr)
    print(link.url)
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.snap_command == "create":
            snap = client.instances.handle(args.id).snapshot(args.name or "")
            if args.json:
                emit_json(snap.to_dict())
            else:
                print(snap.id)
        elif args.snap_command == "list":
            snaps = client.snapshots.list(args.id)
            if args.json:
                emit_json([s.to_dict() for s in snaps])
            elif snaps:
                rows = [
                    [s.id, s.instance_id, s.display_name or "-", human_size(s.size_bytes), _when(s.create_time)]
                    for s in snaps
                ]
                table(rows, ["ID", "INSTANCE", "NAME", "SIZE", "CREATED"])
        else:
            for snapshot_id in args.ids:
                client.snapshots.delete(snapshot_id)
                print(snapshot_id)
    return 0


# --- usage and plan ------------------------------------------------------------------------

_AGO = re.compile(r"^(\d+)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: Any = None) -> Any:
    """`--since`: an ISO date or time (UTC unless it says otherwise), or an age: 90s, 30m, 2h, 7d."""
    import datetime as dt

    now = now or dt.datetime.now(dt.UTC)
    ago = _AGO.match(text.strip())
    if ago:
        return now - dt.timedelta(seconds=int(ago.group(1)) * _UNIT_SECONDS[ago.group(2)])
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"--since {text!r} is not a date, a time or an age (2026-12-01, 2026-12-01T10:00:00Z, 90s, 30m, 2h, 7d)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _seconds(value: int) -> str:
    hours, rest = divmod(value, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def cmd_usage(args: argparse.Namespace) -> int:
    since = parse_since(args.since) if args.since else None
    with _client(args) as client:
        report = client.usage(since=since, instance_id=args.instance)
    if args.json:
        emit_json(report.to_dict())
        return 0
    total = report.total
    print(f"period   {_when(report.start_time)} .. {_when(report.end_time)} UTC (running instances counted to now)")
    run = f"{total.instance_seconds} instance-s ({_seconds(total.instance_seconds)})"
    print(f"compute  {run}, {total.vcpu_seconds} vCPU-s,")
    print(f"         {total.memory_gib_seconds:.1f} GiB-s memory, {total.desktop_seconds} desktop-s")
    print(f"storage  {total.disk_gib_seconds:.1f} GiB-s disk ({total.paused_seconds} s paused)")
    if report.instances:
        print()
        rows = [
            [
                i.instance_id,
                i.state + ("*" if i.open else ""),
                str(i.vcpus),
                str(i.memory_mib),
                str(i.usage.instance_seconds),
                str(i.usage.vcpu_seconds),
                f"{i.usage.memory_gib_seconds:.1f}",
                str(i.usage.paused_seconds),
                f"{i.usage.disk_gib_seconds:.1f}",
            ]
            for i in report.instances
        ]
        table(rows, ["ID", "STATE", "VCPUS", "MEM_MIB", "RUN_S", "VCPU_S", "MEM_GIB_S", "PAUSED_S", "DISK_GIB_S"])
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    with _client(args) as client:
        plan = client.plan()
    if args.json:
        emit_json(plan.to_dict())
        return 0
    monthly = "unlimited" if not plan.monthly_instance_seconds else f"{plan.monthly_instance_seconds} instance-s"
    rows = [
        ["instances", str(plan.used_instances), str(plan.max_instances)],
        ["vcpus", str(plan.used_vcpus), str(plan.max_vcpus)],
        ["memory_mib", str(plan.used_memory_mib), str(plan.max_memory_mib)],
        ["disk_mib", str(plan.used_disk_mib), str(plan.max_disk_mib)],
        ["monthly_instance_seconds", str(plan.used_monthly_instance_seconds), monthly],
        ["max_timeout_seconds", "-", str(plan.max_timeout_seconds)],
        ["desktops", str(plan.used_desktops), "allowed" if plan.desktops_allowed else "not included"],
    ]
    then = f"{plan.credit_policy} after {plan.credit_grace_seconds} s"
    print(f"plan {plan.name}: when the monthly allowance is used up, {then}")
    table(rows, ["LIMIT", "USED", "ALLOWED"])
    if plan.credits_exhausted_time:
        print(f"the monthly allowance was used up at {_when(plan.credits_exhausted_time)} UTC")
    return 0


# --- keys and config -----------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace) -> int:
    from cyberdesk._config import setting

    with _client(args) as client:
        if args.keys_command == "create":
            key, secret = client.keys.create(args.tenant or _tenant(setting), args.name, admin=args.admin)
            if args.json:
                emit_json({**key.to_dict(), "secret": secret})
            else:
                print(
                    f"key_id  {key.key_id}\ntenant  {key.tenant_id}\nscopes  {','.join(key.scopes)}\nsecret  {secret}"
                )
                print("(the secret is shown this once only)", file=sys.stderr)
        elif args.keys_command == "list":
            keys = client.keys.list(args.tenant or _tenant(setting))
            if args.json:
                emit_json([k.to_dict() for k in keys])
            elif keys:
                rows = [
                    [k.key_id, k.prefix + "…", "revoked" if k.revoke_time else "active", ",".join(k.scopes), k.name]
                    for k in keys
                ]
                table(rows, ["KEY_ID", "PREFIX", "STATE", "SCOPES", "NAME"])
        else:
            key = client.keys.revoke(args.key_id)
            print(f"revoked {key.key_id}")
    return 0


def _tenant(setting: Any) -> str:
    tenant = setting("tenant")
    if not tenant:
        raise UsageError("no tenant: pass --tenant T (or `cyberdesk config set tenant T`)")
    return str(tenant)


def cmd_config(args: argparse.Namespace) -> int:
    from cyberdesk._config import DEFAULT_ENDPOINT, KEYS, config_path, parse_endpoint, save_file, setting

    if args.config_command == "path":
        print(config_path())
        return 0
    if args.key not in KEYS:
        raise UsageError(f"unknown setting {args.key!r}; known: {', '.join(KEYS)}")
    if args.config_command == "get":
        value = setting(args.key) or (DEFAULT_ENDPOINT if args.key == "endpoint" else None)
        if value is None:
            print(f"cyberdesk: {args.key} is not set", file=sys.stderr)
            return 1
        print(value)
        return 0
    if args.key == "endpoint":
        parse_endpoint(args.value)
    path = save_file({args.key: args.value})
    print(f"{args.key} written to {path}", file=sys.stderr)
    return 0


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="cyberdesk",
        description="Cloud desktops and sandboxes for AI agents. Start a local stack with `cyberdesk up`.",
    )
    parser.add_argument("--endpoint", help="gRPC endpoint host:port (default: CYBERDESK_ENDPOINT, the config file)")
    parser.add_argument("--api-key", help="API key (default: CYBERDESK_API_KEY, the config file)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole local stack in the foreground (Ctrl-C stops it)")
    up.add_argument("--state-dir", help="state directory (default: CYBERDESK_STATE_DIR or ~/.local/state/cyberdesk)")
    up.add_argument("--gateway-addr", help="gateway gRPC address (default 127.0.0.1:50051)")
    up.add_argument("--http-addr", help="gateway HTTP address (default 127.0.0.1:8080)")
    up.add_argument("--instance-addr", help="instance_svc address (default 127.0.0.1:50061)")
    up.add_argument("--billing-addr", help="billing_svc address (default 127.0.0.1:50071)")
    up.add_argument("--redis-port", type=int, help="port of the stack's own redis-server (default 6390)")
    up.add_argument("--warm-pool", help="warm pool sizes, e.g. base=2,desktop=0")
    up.add_argument("--no-config", action="store_true", help="do not write the CLI config file")
    up.add_argument(
        "--on-exit",
        choices=("end", "keep"),
        help="on Ctrl-C: end the instances (end, the default), or leave them running for the next `up` (keep)",
    )
    up.add_argument(
        "--runtime",
        choices=("local", "kubevirt"),
        help="where instances run: local bubblewrap sandboxes (the default) or KubeVirt VMs in the cluster of the "
        "current kubeconfig (the instance operator must run there; docs/kubernetes.md)",
    )
    up.set_defaults(func=cmd_up)

    create = sub.add_parser("create", help="create an instance and print its id")
    create.add_argument("--template", default="base", help="image (default base)")
    create.add_argument("--timeout", type=float, help="lifetime in seconds (server default 300)")
    create.add_argument("--desktop", action="store_true", help="with an X desktop (screenshots, mouse, keyboard)")
    create.add_argument("--width", type=int, help="desktop width in pixels")
    create.add_argument("--height", type=int, help="desktop height in pixels")
    create.add_argument("--vcpus", type=int)
    create.add_argument("--memory", type=int, metavar="MIB")
    create.add_argument("--env", action="append", metavar="KEY=VALUE")
    create.add_argument("--label", action="append", metavar="KEY=VALUE")
    create.add_argument("--disk", type=int, metavar="MIB", help="disk size in MiB (default the template's: 2048)")
    create.add_argument("--internet", action="store_true", help="allow outbound network access")
    create.add_argument(
        "--allow",
        action="append",
        metavar="CIDR_OR_HOST",
        help="with --internet: connect only to these (CIDR, address, host name, *.example.com; repeatable)",
    )
    create.add_argument(
        "--deny",
        action="append",
        metavar="CIDR_OR_HOST",
        help="with --internet: never connect to these, even when allowed (repeatable)",
    )
    create.add_argument("--snapshot", metavar="SNAPSHOT_ID", help="restore this snapshot's files")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_create)

    listing = sub.add_parser("list", help="list instances (live ones unless --all)")
    listing.add_argument("--all", action="store_true", help="include terminated and failed instances")
    listing.add_argument("--state", action="append", help="only this state (repeatable)")
    listing.add_argument("--label", action="append", metavar="KEY=VALUE")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)

    get = sub.add_parser("get", help="show one instance")
    get.add_argument("id")
    get.add_argument("--json", action="store_true")
    get.set_defaults(func=cmd_get)

    rm = sub.add_parser("rm", help="delete instances")
    rm.add_argument("ids", nargs="+", metavar="ID")
    rm.set_defaults(func=cmd_rm)

    timeout = sub.add_parser("timeout", help="set an instance's remaining lifetime")
    timeout.add_argument("id")
    timeout.add_argument("seconds", type=float)
    timeout.set_defaults(func=cmd_timeout)

    for name, text in (("pause", "pause an instance"), ("resume", "resume a paused instance")):
        p = sub.add_parser(name, help=text)
        p.add_argument("id")
        p.set_defaults(func=cmd_pause)

    ex = sub.add_parser(
        "exec",
        help="run a command, streaming its output; exits with its exit code",
        description="One CMD argument is a shell command line (bash -lc); several are run as an argv.",
    )
    ex.add_argument("id")
    ex.add_argument("--timeout", type=float, help="kill the command after this many seconds (exit code 124)")
    ex.add_argument("--cwd")
    ex.add_argument("--env", action="append", metavar="KEY=VALUE")
    ex.add_argument("-i", "--stdin", action="store_true", help="send this command's stdin to the remote command")
    ex.add_argument("cmd", nargs="*", metavar="CMD")
    ex.set_defaults(func=cmd_exec)

    shell = sub.add_parser("shell", help="interactive shell in an instance")
    shell.add_argument("id")
    shell.add_argument("cmd", nargs="*", metavar="CMD", help="program instead of the login shell")
    shell.set_defaults(func=cmd_shell)

    cp = sub.add_parser("cp", help="copy a file to or from an instance (ID:/PATH on one side)")
    cp.add_argument("src")
    cp.add_argument("dst")
    cp.add_argument("-q", "--quiet", action="store_true")
    cp.set_defaults(func=cmd_cp)

    ls = sub.add_parser("ls", help="list a directory of an instance (ID:/PATH)")
    ls.add_argument("target", metavar="ID:PATH")
    ls.add_argument("-l", "--long", action="store_true")
    ls.add_argument("--depth", type=int, default=1)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)

    shot = sub.add_parser("screenshot", help="save a screenshot of an instance's desktop")
    shot.add_argument("id")
    shot.add_argument("-o", "--output", required=True, help="file to write (.png, or .jpg for JPEG)")
    shot.add_argument("--scale", type=float, help="scale factor in (0, 1]")
    shot.set_defaults(func=cmd_screenshot)

    port = sub.add_parser("port", help="print the preview URL of a port inside an instance")
    port.add_argument("id")
    port.add_argument("port", type=int)
    port.add_argument("--signed", action="store_true", help="a URL carrying an expiring token: no API key needed")
    port.add_argument("--ttl", type=float, default=3600.0, help="seconds the token is valid (default 3600)")
    port.add_argument("--path", action="store_true", help="the path form under the gateway's origin")
    port.add_argument("--json", action="store_true", help="both URLs, the token and its expiry")
    port.set_defaults(func=cmd_port)

    view = sub.add_parser(
        "view", help="watch and drive an instance's desktop live in a browser (opens or prints a link)"
    )
    view.add_argument("id")
    view.add_argument("--view-only", action="store_true", help="the link only watches: its input is dropped")
    view.add_argument("--print", action="store_true", help="print the link instead of opening a browser")
    view.add_argument("--ttl", type=float, default=3600.0, help="seconds the link is valid (default 3600)")
    view.add_argument("--json", action="store_true", help="the link, the stream's WebSocket URL, the token, its expiry")
    view.set_defaults(func=cmd_view)

    snap = sub.add_parser("snapshot", help="create, list or delete snapshots")
    snap_sub = snap.add_subparsers(dest="snap_command", required=True, metavar="create|list|rm")
    s_create = snap_sub.add_parser("create", help="snapshot an instance's files")
    s_create.add_argument("id")
    s_create.add_argument("--name")
    s_create.add_argument("--json", action="store_true")
    s_list = snap_sub.add_parser("list", help="list snapshots")
    s_list.add_argument("id", nargs="?", help="only this instance's")
    s_list.add_argument("--json", action="store_true")
    s_rm = snap_sub.add_parser("rm", help="delete snapshots")
    s_rm.add_argument("ids", nargs="+", metavar="SNAPSHOT_ID")
    snap.set_defaults(func=cmd_snapshot)

    usage = sub.add_parser("usage", help="metered usage of your instances (this month unless --since)")
    usage.add_argument("--since", help="from a date or time (UTC), or an age: 2026-12-01, 90s, 30m, 2h, 7d")
    usage.add_argument("--instance", help="only this instance")
    usage.add_argument("--json", action="store_true", help="print JSON")
    usage.set_defaults(func=cmd_usage)

    plan = sub.add_parser("plan", help="your plan's limits and how much of each is used")
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(func=cmd_plan)

    keys = sub.add_parser("keys", help="manage API keys (needs an admin key)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="create|list|revoke")
    k_create = keys_sub.add_parser("create", help="create a key and print its secret once")
    k_create.add_argument("--tenant", help="default: the `tenant` setting")
    k_create.add_argument("--name", required=True)
    k_create.add_argument("--admin", action="store_true", help="grant key management too")
    k_create.add_argument("--json", action="store_true")
    k_list = keys_sub.add_parser("list", help="list a tenant's keys")
    k_list.add_argument("--tenant")
    k_list.add_argument("--json", action="store_true")
    k_revoke = keys_sub.add_parser("revoke", help="revoke a key")
    k_revoke.add_argument("key_id")
    keys.set_defaults(func=cmd_keys)

    config = sub.add_parser("config", help="read or write the CLI config (endpoint, http_endpoint, api_key, tenant)")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="get|set|path")
    c_get = config_sub.add_parser("get", help="print a setting as the CLI resolves it")
    c_get.add_argument("key")
    c_set = config_sub.add_parser("set", help="write a setting to the config file")
    c_set.add_argument("key")
    c_set.add_argument("value")
    config_sub.add_parser("path", help="print the config file's path")
    config.set_defaults(func=cmd_config)
    return parser


def parse(parser: argparse.ArgumentParser, tokens: list[str]) -> argparse.Namespace:
    """Parse; for `exec`/`shell`, everything after the first `--` is the remote command, never our options."""
    command_tail: list[str] | None = None
    if "--" in tokens and any(t in ("exec", "shell") for t in tokens[: tokens.index("--")]):
        cut = tokens.index("--")
        tokens, command_tail = tokens[:cut], tokens[cut + 1 :]
    args = parser.parse_args(tokens)
    if command_tail is not None:
        if args.cmd:
            parser.error(f"unexpected arguments before --: {' '.join(args.cmd)}")
        args.cmd = command_tail
    return args


# How long the clean-up after a Ctrl-C may take (cancelling the call, closing the channel) before
# the process ends anyway: a user's Ctrl-C must end the command, even if a shutdown step of the
# gRPC library hangs (seen in three loaded runs of the suite; 40 tries alone never hung).
INTERRUPT_GRACE_SECONDS = 5.0


def _interrupt(signum: int, frame: object) -> None:
    """SIGINT: raise KeyboardInterrupt as Python does, with a deadline for what follows it."""
    import threading

    watchdog = threading.Timer(INTERRUPT_GRACE_SECONDS, os._exit, args=(128 + signal.SIGINT,))
    watchdog.daemon = True
    watchdog.start()
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parse(parser, list(sys.argv[1:] if argv is None else argv))
    if args.command == "cp":
        # A whole process of our own: tune malloc for the megabyte chunks `cp` moves (the SDK
        # leaves that choice to its host program).
        from cyberdesk import keep_large_blocks

        keep_large_blocks()
    if args.command != "up":  # `up` stops the stack on Ctrl-C itself, however long that takes
        signal.signal(signal.SIGINT, _interrupt)
    try:
        code: int = args.func(args)
        return code
    except UsageError as err:
        print(f"cyberdesk {args.command}: {err}", file=sys.stderr)
        return 2
    except (ConfigurationError, InvalidArgument) as err:
        print(f"cyberdesk {args.command}: {err}", file=sys.stderr)
        return 2
    except Unavailable as err:
        hint = "" if args.command == "up" else " (is the stack running? start it with `cyberdesk up`)"
        print(f"cyberdesk {args.command}: {err}{hint}", file=sys.stderr)
        return 1
    except CyberdeskError as err:
        print(f"cyberdesk {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # Output piped into `head` and closed: not an error worth a line.
        sys.stderr.close()
        return 1
    except OSError as err:
        print(
            f"cyberdesk {args.command}: {err.strerror or err}{f': {err.filename}' if err.filename else ''}",
            file=sys.stderr,
        )
        return 1
    except Exception as err:  # never a traceback in front of a user
        print(f"cyberdesk {args.command}: unexpected error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
