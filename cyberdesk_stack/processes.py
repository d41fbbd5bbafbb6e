"""Starting our own processes and knowing when they answer: one launcher for the stack, tests and bench.

`cyberdesk up` (launcher.py), the test suite and the benchmarks all start the same kinds of
process: a service as `python -m <package>`, a redis-server, a bare guest agent on a unix socket.
Each needs the same three things done right: a port that is free, a wait that ends when the gRPC
health service says SERVING (or fails at once when the process has died, with its log), and a
stop that asks politely (SIGTERM, so the service drains) before it kills.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def repo_root() -> Path | None:
    """The checkout holding the services, when they run from one (editable install); else None."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "instance_svc").is_dir() and (here / "gateway_svc").is_dir() else None


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus `env`, with the checkout first on PYTHONPATH when there is one.

    The checkout goes first so that a child runs the code of this tree even where another copy of
    the packages is installed.
    """
    full = {**os.environ, **(env or {})}
    root = repo_root()
    if root is not None:
        full["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), full.get("PYTHONPATH", "")) if p)
    return full


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(
    target: str,
    timeout: float = 15.0,
    proc: subprocess.Popen[bytes] | None = None,
    check: Callable[[], None] | None = None,
) -> None:
    """Block until the gRPC health service at `target` says SERVING.

    Fails at once (RuntimeError) when `proc` exits first, and calls `check` between attempts so a
    caller can abort the wait (the launcher raises from it on Ctrl-C).
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if check is not None:
                check()
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before becoming healthy")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as err:
                last = err
            time.sleep(0.05)
    raise TimeoutError(f"{target} not healthy after {timeout}s: {last}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM (a service drains its calls), then SIGKILL after `timeout`; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@dataclass
class Service:
    """A running process of ours: where it answers and where its output goes."""

    proc: subprocess.Popen[bytes]
    target: str
    log_path: Path

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        return stop(self.proc, timeout)


def spawn(
    argv: list[str], env: Mapping[str, str] | None, log_path: Path, *, process_group: bool = False
) -> subprocess.Popen[bytes]:
    """Start `argv` with `child_env(env)`, stdout and stderr appended to `log_path`.

    `process_group=True` puts the child in a group of its own, so the terminal's Ctrl-C reaches
    only the parent, which then stops its children in order.
    """
    with open(log_path, "ab") as sink:
        return subprocess.Popen(
            argv,
            cwd=repo_root(),
            env=child_env(env),
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            process_group=0 if process_group else None,
        )


@contextmanager
def service(
    module: str,
    target: str,
    env: Mapping[str, str],
    log_dir: Path,
    health_target: str | None = None,
    timeout: float = 15.0,
) -> Iterator[Service]:
    """Run `python -m module` until the block ends, once its health service answers on `target`."""
    log_path = log_dir / f"{module}.log"
    proc = spawn([sys.executable, "-m", module], env, log_path)
    svc = Service(proc, target, log_path)
    try:
        wait_healthy(health_target or target, timeout=timeout, proc=proc)
        yield svc
    finally:
        stop(proc)


def redis_password(path: Path) -> str:
    """The Redis password kept in `path` (mode 0600), generated on first use.

    O_EXCL: two launchers starting at once cannot both write a different secret. The secret is
    URL-safe base64, so it goes into a redis:// URL and a redis.conf line without quoting.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        password = path.read_text().strip()
        if len(password) < 16 or not password.replace("-", "").replace("_", "").isalnum():
            raise ValueError(
                f"{path} holds no usable Redis password (16 or more of A-Z a-z 0-9 - _); delete it to make a new one"
            ) from None
        return password
    password = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    return password


def redis_url(port: int, password: str, host: str = "127.0.0.1", db: int = 0) -> str:
    """The URL our services get in REDIS_URL: the password as the URL's (default user) password."""
    return f"redis://:{password}@{host}:{port}/{db}"


def redis_argv(port: int, data_dir: Path, password: str, *, persist: bool = False) -> list[str]:
    """A redis-server on loopback only that requires `password`; `persist` keeps an append-only file (fsync 1/s).

    The settings go into `data_dir`/redis.conf (mode 0600) and only that file's path goes on the
    command line: anything in argv is readable by every local user in /proc/<pid>/cmdline and in
    `ps`, and a tenant that reached the host would read the password there.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed: run `make setup`")
    conf = data_dir / "redis.conf"
    lines = [
        f"port {port}",
        # Only where the services are: never a wildcard address a sandbox's network could reach.
        "bind 127.0.0.1",
        "protected-mode yes",
        f'dir "{data_dir}"',
        'save ""',
        f"appendonly {'yes' if persist else 'no'}",
        # Said, not left to the default: the event stream billing reads (and the rate limits) must
        # survive a kill -9 of Redis with at most a second lost, without an fsync per write.
        "appendfsync everysec",
        f"requirepass {password}",
    ]
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file may have had a wider mode: O_CREAT's mode applies only to new files
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    return [binary, str(conf)]


def wait_redis(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 15.0, check: Callable[[], None] | None = None
) -> None:
    """Block until the redis at `url` answers PING; RuntimeError when `proc` exits first.

    A refused password (AuthenticationError, a ConnectionError) fails at once: waiting longer
    cannot fix it, and the message never repeats the URL, which carries the password.
    """
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.AuthenticationError as err:
                raise RuntimeError(f"redis-server refused the password: {err}") from None
            except redis.ConnectionError:
                if check is not None:
                    check()
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {proc.returncode}") from None
                if time.monotonic() > deadline:
                    port = client.get_connection_kwargs().get("port")
                    raise TimeoutError(f"redis-server did not answer on port {port} after {timeout}s") from None
                time.sleep(0.05)
    finally:
        client.close()


@contextmanager
def redis_server(data_dir: Path, port: int | None = None, password: str | None = None) -> Iterator[str]:
    """A throwaway redis-server (no persistence) that requires a password; yields its URL.

    The password is new for each server unless given (a test restarting "the same" Redis passes
    the first one's), so every test and benchmark exercises the authenticated path that
    `cyberdesk up` and Kubernetes use.
    """
    port = port or free_port()
    password = password or secrets.token_urlsafe(24)
    proc = spawn(redis_argv(port, data_dir, password), None, data_dir / "redis.log")
    url = redis_url(port, password)
    try:
        wait_redis(url, proc)
        yield url
    finally:
        stop(proc)


@dataclass
class AgentProcess(Service):
    """A bare guest agent on this host (no sandbox): its socket, token and instance."""

    instance_id: str = ""
    token: str = ""
    workdir: Path = field(default_factory=Path)

    @property
    def pid(self) -> int:
        """The agent's process id on this host."""
        return self.proc.pid

    @property
    def home(self) -> Path:
        """The agent's HOME."""
        return self.workdir / "home"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata the agent accepts."""
        return (("authorization", f"Bearer {self.token}"),)


@contextmanager
def guest_agent(
    workdir: Path,
    instance_id: str,
    *,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
) -> Iterator[AgentProcess]:
    """`python -m guest_agent` on a unix socket in `workdir`, bound to `instance_id`.

    HOME is a fresh directory, as in an instance: the host user's shell profile (pyenv, conda...)
    would otherwise dominate every `bash -lc` the agent runs; DISPLAY is empty unless `env` sets it.
    """
    token = token or secrets.token_urlsafe(24)
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    target = f"unix://{workdir / 'agent.sock'}"
    agent_env = {
        "CYBERDESK_AGENT_LISTEN": target,
        "CYBERDESK_AGENT_TOKEN": token,
        "CYBERDESK_AGENT_INSTANCE_ID": instance_id,
        "HOME": str(home),
        "DISPLAY": "",
        **(env or {}),
    }
    log_path = workdir / "guest_agent.log"
    proc = spawn([sys.executable, "-m", "guest_agent"], agent_env, log_path)
    try:
        wait_healthy(target, timeout=timeout, proc=proc)
        yield AgentProcess(proc, target, log_path, instance_id=instance_id, token=token, workdir=workdir)
    finally:
        stop(proc)
