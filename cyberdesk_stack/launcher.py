"""The local stack in the foreground (`cyberdesk up`, `make run`); Ctrl-C stops all of it.

What runs: Redis (its own process and data directory under the state directory, unless REDIS_URL
is given; it requires the password kept in `<state>/redis_password`, 0600, made on first start,
and every service gets it only inside REDIS_URL in its environment, never on a command line),
instance_svc with the local runtime and its warm pool, billing_svc, and the gateway.
On first start a development API key (tenant `dev`, admin scope) is made with the gateway's
key-store bootstrap (`gateway_svc.keystore.create_key`, a function call: no gateway needed); it
is kept in `<state>/dev_api_key` (0600) and written, with the endpoint, to the CLI config file
so that `cyberdesk create` works at once.

Stopping is ordered so that nothing is left behind: the instances of the development tenant are
deleted through the API while everything still runs, then the services get SIGTERM (gateway
first, Redis last), then any sandbox still running under this state directory (the warm pool's,
or another tenant's) is destroyed with the local runtime's own code. instance_svc keeps sandboxes
across its own restarts on purpose; `up` owns its state directory, so it cleans up after itself.

Services run in their own process group: the terminal's Ctrl-C reaches only this launcher, which
then stops them in order instead of all of them dying at once.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cyberdesk_common.log import mask_secrets
from cyberdesk_stack import processes

DEV_TENANT = "dev"
_READY_TIMEOUT = 90.0


class StackError(Exception):
    """The stack cannot start; the message says what to do."""


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) arrived while the stack was starting."""


@dataclass
class StackOptions:
    """Where everything listens and lives; every field has a default that works on one machine."""

    state_dir: Path
    gateway_addr: str = "127.0.0.1:50051"
    http_addr: str = "127.0.0.1:8080"
    instance_addr: str = "127.0.0.1:50061"
    billing_addr: str = "127.0.0.1:50071"
    redis_port: int = 6390
    redis_url: str | None = None
    warm_pool: str | None = None
    write_config: bool = True

    @classmethod
    def from_env(cls) -> StackOptions:
        """Defaults, overridden by the CYBERDESK_* variables the services read themselves."""
        env = os.environ
        state = Path(env.get("CYBERDESK_STATE_DIR") or Path.home() / ".local" / "state" / "cyberdesk").expanduser()
        return cls(
            state_dir=state,
            gateway_addr=env.get("CYBERDESK_GATEWAY_ADDR") or cls.gateway_addr,
            http_addr=env.get("CYBERDESK_GATEWAY_HTTP_ADDR") or cls.http_addr,
            instance_addr=env.get("CYBERDESK_INSTANCE_ADDR") or cls.instance_addr,
            billing_addr=env.get("CYBERDESK_BILLING_ADDR") or cls.billing_addr,
            redis_port=int(env.get("CYBERDESK_REDIS_PORT") or cls.redis_port),
            redis_url=env.get("REDIS_URL") or None,
            warm_pool=env.get("CYBERDESK_WARM_POOL") or None,
        )


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Stack:
    """The running stack: its children, in start order."""

    options: StackOptions
    out: TextIO = field(default=sys.stdout)
    children: list[_Child] = field(default_factory=list)
    redis_url: str = ""
    api_key: str = ""
    http_endpoint: str = ""
    stopping: bool = False
    lock_fd: int | None = None

    def _lock(self) -> None:
        """One `up` per state directory: a second one would share (and on exit destroy) its sandboxes."""
        import fcntl

        path = self.options.state_dir / "up.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StackError(
                f"another `cyberdesk up` (pid {holder}) is running with the state directory {self.options.state_dir}; "
                "stop it first, or pass --state-dir (and other ports) for a second stack"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.lock_fd = fd

    def _check(self) -> None:
        if self.stopping:
            raise Interrupted()

    # --- start -----------------------------------------------------------------------------

    def _logs(self) -> Path:
        path = self.options.state_dir / "logs"
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None) -> _Child:
        log = self._logs() / f"{name}.log"
        child = _Child(name, processes.spawn(argv, env, log, process_group=True), log)
        self.children.append(child)
        return child

    def _env(self) -> dict[str, str]:
        opts = self.options
        env = {
            "REDIS_URL": self.redis_url,
            "CYBERDESK_STATE_DIR": str(opts.state_dir),
            "CYBERDESK_GATEWAY_ADDR": opts.gateway_addr,
            "CYBERDESK_GATEWAY_HTTP_ADDR": opts.http_addr,
            "CYBERDESK_INSTANCE_ADDR": opts.instance_addr,
            "CYBERDESK_BILLING_ADDR": opts.billing_addr,
            "CYBERDESK_RUNTIME": "local",
        }
        if opts.warm_pool is not None:
            env["CYBERDESK_WARM_POOL"] = opts.warm_pool
        return env

    def _start_redis(self) -> None:
        if self.options.redis_url:
            self.redis_url = self.options.redis_url
            return
        state = self.options.state_dir
        data = state / "redis"
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        port = self.options.redis_port
        try:
            # Made once per state directory (0600) and kept: the append-only file outlives a
            # restart, and so does every service's REDIS_URL in a running shell.
            password = processes.redis_password(state / "redis_password")
        except (OSError, ValueError) as err:
            raise StackError(f"cannot read or create the Redis password: {err}") from None
        try:
            argv = processes.redis_argv(port, data, password, persist=True)
        except FileNotFoundError:
            raise StackError("redis-server is not installed: run `make setup` (or set REDIS_URL)") from None
        child = self._spawn("redis", argv, None)
        self.redis_url = processes.redis_url(port, password)
        try:
            processes.wait_redis(self.redis_url, child.proc, check=self._check)
        except (RuntimeError, TimeoutError) as err:
            raise StackError(f"redis-server did not start on port {port} ({err}); see {child.log}") from None

    def _wait_healthy(self, child: _Child, target: str) -> None:
        try:
            processes.wait_healthy(target, timeout=_READY_TIMEOUT, proc=child.proc, check=self._check)
        except RuntimeError:
            raise StackError(f"{child.name} exited with code {child.proc.returncode}:\n{_tail(child.log)}") from None
        except TimeoutError:
            raise StackError(f"{child.name} did not become healthy on {target}; see {child.log}") from None

    def start(self) -> None:
        """Start Redis, then the services in dependency order, each once the one before answers."""
        missing = [b for b in ("bwrap",) if shutil.which(b) is None]
        if missing:
            raise StackError(f"missing {', '.join(missing)}: run `make setup` (it installs bubblewrap)")
        self.options.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock()
        self._start_redis()
        env = self._env()
        python = sys.executable
        for module, target in (
            ("instance_svc", self.options.instance_addr),
            ("billing_svc", self.options.billing_addr),
            ("gateway_svc", self.options.gateway_addr),
        ):
            child = self._spawn(module, [python, "-m", module], env)
            self._wait_healthy(child, target)
        # The gateway's REST face (uvicorn in the same process) may bind a moment after gRPC.
        deadline = time.monotonic() + 5
        while True:
            if _listening(self.options.http_addr):
                self.http_endpoint = f"http://{self.options.http_addr}"
                break
            if time.monotonic() > deadline:
                break
            self._check()
            time.sleep(0.1)
        self.api_key = self._dev_key()

    def _dev_key(self) -> str:
        """The development key: made once per state directory, re-made if the key store lost it."""
        from cyberdesk import Unauthenticated

        path = self.options.state_dir / "dev_api_key"
        if path.exists():
            key = path.read_text().strip()
            try:
                self._client(key).instances.list(states=["RUNNING"])
                return key
            except Unauthenticated:
                pass  # the key store was reset: make a new key below
        from cyberdesk_common.config import env_str

        if env_str("UNKEY_ROOT_KEY", ""):
            raise StackError("keys live in Unkey (UNKEY_ROOT_KEY is set): create the development key there")
        from gateway_svc.auth import SCOPE_ADMIN, SCOPE_INSTANCES
        from gateway_svc.keystore import create_key

        try:
            _record, key = create_key(
                self.options.state_dir, DEV_TENANT, "cyberdesk up", [SCOPE_INSTANCES, SCOPE_ADMIN]
            )
        except OSError as err:
            raise StackError(f"could not create the development API key: {err}") from None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
        return key

    def _client(self, key: str):  # type: ignore[no-untyped-def]
        from cyberdesk import Cyberdesk

        return Cyberdesk(api_key=key, endpoint=self.options.gateway_addr, timeout=30)

    def announce(self) -> None:
        """Print the endpoints; write endpoint and key to the CLI config."""
        p = self.out
        print("Cyberdesk is running (Ctrl-C stops everything)", file=p)
        print(f"  gateway (gRPC)   {self.options.gateway_addr}", file=p)
        if self.http_endpoint:
            print(f"  gateway (HTTP)   {self.http_endpoint}", file=p)
        print(f"  instance_svc     {self.options.instance_addr}", file=p)
        print(f"  billing_svc      {self.options.billing_addr}", file=p)
        print(f"  redis            {mask_secrets(self.redis_url)}", file=p)
        print(f"  state directory  {self.options.state_dir} (logs in {self._logs()})", file=p)
        if self.options.write_config:
            from cyberdesk._config import save_file

            values = {"endpoint": self.options.gateway_addr, "api_key": self.api_key, "tenant": DEV_TENANT}
            if self.http_endpoint:
                values["http_endpoint"] = self.http_endpoint
            written = save_file(values)
            print(f"  CLI config       {written} (endpoint and development API key)", file=p)
        print("Try: cyberdesk create --json", file=p, flush=True)

    # --- run and stop ----------------------------------------------------------------------

    def watch(self) -> int:
        """Block until a signal sets `stopping` or a child dies; the exit code to return."""
        while not self.stopping:
            for child in self.children:
                if child.proc.poll() is not None:
                    print(f"{child.name} exited with code {child.proc.returncode}; stopping the stack", file=sys.stderr)
                    print(_tail(child.log), file=sys.stderr)
                    return 1
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        """Delete the development tenant's instances, stop every child, destroy leftover sandboxes."""
        if self.lock_fd is None:
            return  # nothing of ours runs: the state directory belongs to another `up`
        if self.api_key and self._all_alive():
            try:
                with self._client(self.api_key) as client:
                    for inst in client.instances.list(states=["PENDING", "STARTING", "RUNNING", "PAUSED"]):
                        inst.delete()
            except Exception as err:  # stopping goes on whatever the API says
                print(f"could not delete instances through the API ({err}); sweeping sandboxes", file=sys.stderr)
        # Gateway first (no new calls), Redis last (the others may write to it while draining).
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(30)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        swept = sweep_sandboxes(self.options.state_dir)
        if swept:
            print(f"destroyed {swept} leftover sandbox(es)", file=self.out)
        os.close(self.lock_fd)
        self.lock_fd = None

    def _all_alive(self) -> bool:
        return all(child.proc.poll() is None for child in self.children)


def sweep_sandboxes(state_dir: Path) -> int:
    """Destroy every sandbox of the local runtime under `state_dir`; returns how many were running.

    Stopped ones too: a sandbox whose processes are gone still has its disk mounted (and its loop
    device attached) until it is deleted.
    """
    base = state_dir / "instances"
    if not base.is_dir():
        return 0
    from instance_svc.runtime.local import LocalRuntime

    async def sweep() -> int:
        runtime = LocalRuntime(base)
        count = 0
        try:
            for info in await runtime.list():
                await runtime.delete(info.sandbox_id)
                count += int(info.running)
        finally:
            await runtime.close()
        return count

    return asyncio.run(sweep())


def _listening(addr: str) -> bool:
    import socket

    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except (OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run(options: StackOptions, out: TextIO = sys.stdout) -> int:
    """Start the stack, serve until SIGINT/SIGTERM or a child dies, stop it cleanly. Returns the exit code."""
    stack = Stack(options, out)

    def _on_signal(signum: int, frame: object) -> None:
        stack.stopping = True

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 1
    try:
        stack.start()
        stack.announce()
        code = stack.watch()
    except Interrupted:
        code = 0
    except StackError as err:
        print(f"cyberdesk up: {err}", file=sys.stderr)
        code = 1
    finally:
        started = stack.lock_fd is not None
        if started:
            print("stopping...", file=out, flush=True)
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started:
            print("stopped", file=out, flush=True)
    return code
