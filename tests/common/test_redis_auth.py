"""The platform's Redis requires a password, and the password stays out of argv, logs and errors.

Two Redis servers are checked: the test suite's own (`redis_url`, started by
`cyberdesk_stack.processes.redis_server`) and the one `cyberdesk up` starts under its state
directory, with every service of the stack talking to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from cyberdesk_common import lifecycle_events
from cyberdesk_common.lifecycle_events import EventStreamUnavailable
from cyberdesk_common.log import JsonFormatter, mask_secrets
from cyberdesk_common.status import RpcError
from cyberdesk_stack.processes import redis_password
from gateway_svc.ratelimit import _GCRA, Limit, RateLimiter
from instance_svc import events
from tests.cli.stack import RunningStack, running_stack
from tests.support.procs import free_port


def _raw(port: int, payload: bytes) -> bytes:
    """Send RESP `payload` to 127.0.0.1:`port` on a fresh connection without AUTH; the first reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply


def _cmdlines() -> dict[int, bytes]:
    """Every process's command line (arguments joined by NUL), as any local user can read them."""
    found: dict[int, bytes] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:
                continue  # the process ended meanwhile
    return found


def _password(url: str) -> str:
    password = urlsplit(url).password
    assert password, f"the URL carries no password: {mask_secrets(url)}"
    return password


# --- the test suite's redis --------------------------------------------------------------------


def test_the_suites_redis_refuses_clients_without_the_password(redis_url: str) -> None:
    parts = urlsplit(redis_url)
    assert parts.port is not None and parts.hostname == "127.0.0.1"
    assert _raw(parts.port, b"PING\r\n").startswith(b"-NOAUTH")
    assert _raw(parts.port, b"XLEN cyberdesk:events\r\n").startswith(b"-NOAUTH")
    assert _raw(parts.port, b"AUTH not-the-password\r\n").startswith(b"-WRONGPASS")
    # The same with redis-py: the URL without its password is refused, the URL with it answers.
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=parts.port).ping()
    assert redis.Redis.from_url(redis_url).ping()


def test_the_suites_redis_password_is_in_no_command_line(redis_url: str) -> None:
    secret = _password(redis_url).encode()
    leaking = [pid for pid, cmdline in _cmdlines().items() if secret in cmdline]
    assert leaking == []
    # The server still runs with the password: it read it from a 0600 config file.
    info = redis.Redis.from_url(redis_url).info("server")
    conf = Path(info["config_file"])
    assert secret in conf.read_bytes()
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    port = urlsplit(redis_url).port
    (pid,) = [
        pid for pid, line in _cmdlines().items() if line.startswith(b"/") and f"127.0.0.1:{port}".encode() in line
    ]
    assert pid == info["process_id"]


def test_the_rate_limiter_authenticates_as_an_acl_user_too(redis_url: str) -> None:
    """`redis://user:pass@` sends AUTH user pass; a wrong password fails open, as an outage does."""
    admin = redis.Redis.from_url(redis_url)
    user, password = f"rl-{free_port()}", "acl-user-password-123"
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], commands=["+@all"], keys=["*"])
    host = redis_url.rsplit("@", 1)[1]

    async def scenario() -> None:
        good = RateLimiter(f"redis://{user}:{password}@{host}", prefix="acl:")
        wrong = RateLimiter(f"redis://{user}:wrong@{host}", prefix="acl:")
        anonymous = RateLimiter(f"redis://{host}", prefix="acl:")
        try:
            assert (await good.check(user, Limit(5, 3600))).remaining == 4  # enforced: Redis answered
            assert (await wrong.check(user, Limit(5, 3600))).remaining == -1  # refused: fails open
            assert (await anonymous.check(user, Limit(5, 3600))).remaining == -1  # NOAUTH: fails open
        finally:
            for limiter in (good, wrong, anonymous):
                await limiter.close()

    try:
        asyncio.run(scenario())
        assert admin.exists(f"acl:{user}") == 1
    finally:
        admin.acl_deluser(user)
        admin.delete(f"acl:{user}")
        admin.close()


def test_an_event_stream_error_never_shows_the_password(redis_url: str) -> None:
    """What a WatchInstances caller sees when the password is wrong: the host and port, no secret."""
    host = redis_url.rsplit("@", 1)[1]
    bad = f"redis://:wrong-secret-xyz@{host}"

    async def tail_once() -> str:
        client = lifecycle_events.connect(bad)
        try:
            with pytest.raises(EventStreamUnavailable) as caught:
                async for _ in lifecycle_events.tail(client):
                    break
            return str(caught.value)
        finally:
            await client.aclose()

    async def watch_once() -> RpcError:
        with pytest.raises(RpcError) as caught:
            async for _ in events.watch(bad, "tenant"):
                break
        return caught.value

    message = asyncio.run(tail_once())
    assert "wrong-secret-xyz" not in message and "the event stream (redis at 127.0.0.1:" in message
    error = asyncio.run(watch_once())
    assert error.code.name == "UNAVAILABLE"
    assert error.message == "the event stream is unavailable; retry shortly"


def test_log_lines_mask_url_passwords() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.redis_auth")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("connecting to redis://:hunter2-secret@10.0.0.1:6379/0", extra={"url": "redis://u:pw-9@h:1/0"})
        try:
            raise ConnectionError("cannot reach rediss://admin:tb-secret@redis.example:6380/2")
        except ConnectionError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    for secret in ("hunter2-secret", "pw-9", "tb-secret"):
        assert secret not in text
    first = json.loads(text.splitlines()[0])
    assert first["msg"] == "connecting to redis://:***@10.0.0.1:6379/0"
    assert first["url"] == "redis://u:***@h:1/0"
    # A URL without userinfo, or an "@" in a path, is left as it is.
    assert mask_secrets("http://host:8080/a@b unix:/run/x.sock") == "http://host:8080/a@b unix:/run/x.sock"


# --- the stack's redis (`cyberdesk up`) --------------------------------------------------------


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """`cyberdesk up` with no REDIS_URL: it starts (and secures) its own redis-server."""
    with running_stack(tmp_path_factory.mktemp("up")) as running:
        yield running


def _stack_redis(stack: RunningStack) -> tuple[int, str]:
    """The port and password of the stack's redis, read from its state directory as an operator would."""
    conf = (stack.state_dir / "redis" / "redis.conf").read_text().splitlines()
    port = int(next(line.split()[1] for line in conf if line.startswith("port ")))
    return port, (stack.state_dir / "redis_password").read_text().strip()


def _service_pids(stack: RunningStack) -> dict[str, int]:
    """The pids of the stack's services (`python -m instance_svc` ...), found by their command lines."""
    pids: dict[str, int] = {}
    for pid, cmdline in _cmdlines().items():
        args = cmdline.split(b"\0")
        for module in ("instance_svc", "billing_svc", "gateway_svc"):
            if args[1:3] == [b"-m", module.encode()]:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                if f"CYBERDESK_STATE_DIR={stack.state_dir}".encode() in environ.split(b"\0"):
                    pids[module] = pid
    return pids


def test_up_makes_a_private_password_and_redis_refuses_clients_without_it(up: RunningStack) -> None:
    secret_file = up.state_dir / "redis_password"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((up.state_dir / "redis" / "redis.conf").stat().st_mode) == 0o600
    port, password = _stack_redis(up)
    assert len(password) >= 32
    assert _raw(port, b"PING\r\n").startswith(b"-NOAUTH")
    assert _raw(port, b"CLIENT LIST\r\n").startswith(b"-NOAUTH")
    assert _raw(port, b"AUTH guess\r\n").startswith(b"-WRONGPASS")
    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    try:
        assert client.ping()
        # Listening on loopback only: the one place the services are.
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("protected-mode")["protected-mode"] == "yes"
    finally:
        client.close()


def test_every_service_works_with_the_password(up: RunningStack) -> None:
    """An instance's lifecycle goes through the gateway (rate limit), instance_svc (publisher) and the stream."""
    port, password = _stack_redis(up)
    client = redis.Redis(host="127.0.0.1", port=port, password=password, decode_responses=True)
    try:
        created = up.cli("create", "--json")
        assert created.returncode == 0, created.stderr.decode()
        instance_id = json.loads(created.stdout)["instance_id"]
        # Tenant code sees none of it: not in its environment, its PID 1's, or any process it can list.
        probe = "env; tr '\\0' '\\n' < /proc/1/environ; cat /proc/[0-9]*/cmdline; ls -a / /run 2>&1"
        inside = up.cli("exec", instance_id, "--", "sh", "-c", probe)
        assert inside.returncode == 0, inside.stderr.decode()
        assert b"CYBERDESK_AGENT_INSTANCE_ID" in inside.stdout  # the probe did read PID 1's environment
        assert password.encode() not in inside.stdout + inside.stderr
        assert b"REDIS" not in inside.stdout.upper()
        deleted = up.cli("rm", instance_id)
        assert deleted.returncode == 0, deleted.stderr.decode()
        # The publisher drains its outbox in the background: wait for the last change to arrive.
        deadline = time.monotonic() + 15
        states: list[str] = []
        while "TERMINATED" not in states and time.monotonic() < deadline:
            time.sleep(0.1)
            entries: Any = client.xrange("cyberdesk:events")
            states = [fields["new_state"] for _, fields in entries if fields.get("instance_id") == instance_id]
        assert states[:3] == ["PENDING", "STARTING", "RUNNING"] and states[-1] == "TERMINATED", states
        # The gateway's rate limiter loaded its script (it authenticated: it would fail open
        # otherwise, and its buckets expire within milliseconds, so the script is the trace).
        assert client.script_exists(hashlib.sha1(_GCRA.encode()).hexdigest()) == [True]
    finally:
        client.close()
    logs = {path.name: path.read_text(errors="replace") for path in (up.state_dir / "logs").glob("*.log")}
    assert "rate limits not enforced" not in logs["gateway_svc.log"]
    assert "not following lifecycle events" not in logs["gateway_svc.log"]
    assert "redis unreachable" not in logs["instance_svc.log"]


def test_the_password_is_in_environments_only_never_in_argv_or_logs(up: RunningStack) -> None:
    port, password = _stack_redis(up)
    secret = password.encode()
    assert [pid for pid, cmdline in _cmdlines().items() if secret in cmdline] == []
    pids = _service_pids(up)
    assert set(pids) == {"instance_svc", "billing_svc", "gateway_svc"}
    expected = f"REDIS_URL=redis://:{password}@127.0.0.1:{port}/0".encode()
    for module, pid in pids.items():
        assert expected in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"), module
    for path in (up.state_dir / "logs").glob("*.log"):
        assert secret not in path.read_bytes(), path.name
    assert secret not in bytes(up.output)  # the banner shows redis://:***@127.0.0.1:PORT/0
    assert f"redis://:***@127.0.0.1:{port}/0".encode() in bytes(up.output)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, check=True).stdout
    assert secret not in ps


def test_the_password_file_is_made_once_and_kept(tmp_path: Path) -> None:
    """A second start reads the same file: the append-only data and a running shell's REDIS_URL stay valid."""
    path = tmp_path / "redis_password"
    first = redis_password(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) >= 32
    assert redis_password(path) == first
    path.write_text("short\n")
    with pytest.raises(ValueError, match="no usable Redis password"):
        redis_password(path)


def test_the_services_find_the_url_and_its_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CYBERDESK_REDIS_URL, else REDIS_URL, else the local stack's Redis with <state>/redis_password."""
    from cyberdesk_common.config import platform_redis_url

    monkeypatch.delenv("CYBERDESK_REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert platform_redis_url(tmp_path) == "redis://127.0.0.1:6390/0"
    password = redis_password(tmp_path / "redis_password")
    assert platform_redis_url(tmp_path) == f"redis://:{password}@127.0.0.1:6390/0"
    monkeypatch.setenv("REDIS_URL", "redis://user:given@10.0.0.2:6379/1")
    assert platform_redis_url(tmp_path) == "redis://user:given@10.0.0.2:6379/1"
    monkeypatch.setenv("CYBERDESK_REDIS_URL", "rediss://:first@redis.example:6380/0")
    assert platform_redis_url(tmp_path) == "rediss://:first@redis.example:6380/0"
