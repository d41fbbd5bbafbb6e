"""The local stack in the foreground (`cyberdesk up`, `make run`), supervised; Ctrl-C stops it.

What runs: Redis (its own process and data directory under the state directory, unless REDIS_URL
is given; it requires the password kept in `<state>/redis_password`, 0600, made on first start,
and every service gets it only inside REDIS_URL in its environment, never on a command line),
instance_svc with the local runtime and its warm pool (or, with `--runtime kubevirt`, with
instances as KubeVirt VMs in the cluster of the current kubeconfig: see docs/kubernetes.md),
billing_svc, and the gateway.
On first start a development API key (tenant `dev`, admin scope) is made with the gateway's
key-store bootstrap (`gateway_svc.keystore.create_key`, a function call: no gateway needed); it
is kept in `<state>/dev_api_key` (0600) and written, with the endpoint, to the CLI config file
so that `cyberdesk create` works at once.

While it runs, `up` supervises (cyberdesk_stack/supervisor.py): a service or Redis that dies is
logged with its cause and restarted with back-off, for as long as `up` runs, and the instances go
on running meanwhile: instance_svc re-adopts their sandboxes when it comes back, the gateway and
instance_svc reconnect to a restarted Redis (same port, same password, its append-only file).
The current pids are in `<state>/pids.json`.

Stopping (Ctrl-C, SIGTERM) follows `--on-exit`:
- `end` (the default): the instances end at the time of the stop. instance_svc is started with
  INSTANCE_SVC_ON_SHUTDOWN=end, gets SIGTERM (after the gateway and billing_svc) and time to
  destroy its sandboxes and record their end itself; only what it left running (it did not exit
  in time, or was down) is destroyed by the launcher's sweep, which says how many it found.
- `keep`: the services stop, the sandboxes keep running (INSTANCE_SVC_ON_SHUTDOWN=keep), and the
  next `up` on the same state directory re-adopts them, deadlines included.
Redis stops last either way: instance_svc publishes the instances' last events while it drains.

Services run in their own process group: the terminal's Ctrl-C reaches only this launcher, which
then stops them in order instead of all of them dying at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Literal, TextIO

from cyberdesk_common.log import mask_secrets
from cyberdesk_stack import processes
from cyberdesk_stack.supervisor import Child, Supervisor, tail

DEV_TENANT = "dev"
_READY_TIMEOUT = 90.0
# How long instance_svc may take to end its instances on SIGTERM (--on-exit end) before the
# launcher kills it and sweeps; the others only drain calls (their gRPC grace is 10 s).
_INSTANCE_SVC_STOP_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0

Check = Callable[[], None]
OnExit = Literal["end", "keep"]
ON_EXIT_CHOICES: tuple[OnExit, ...] = ("end", "keep")


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
    on_exit: OnExit = "end"
    # "local" (bubblewrap sandboxes on this host) or "kubevirt" (CyberdeskInstance resources in the
    # cluster of the current kubeconfig, run by the instance operator there).
    runtime: str = "local"

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
            on_exit=_on_exit(env.get("CYBERDESK_ON_EXIT") or cls.on_exit),
            runtime=_runtime(env.get("CYBERDESK_RUNTIME") or cls.runtime),
        )


RUNTIME_CHOICES = ("local", "kubevirt")


def _runtime(value: str) -> str:
    if value in RUNTIME_CHOICES:
        return value
    print(f"cyberdesk up: CYBERDESK_RUNTIME={value!r} is not one of {', '.join(RUNTIME_CHOICES)}", file=sys.stderr)
    raise SystemExit(2)


def _on_exit(value: str) -> OnExit:
    for choice in ON_EXIT_CHOICES:
        if value == choice:
            return choice
    # Read before anything runs, outside run()'s error handling: one line and exit code 2, as for a bad flag.
    print(f"cyberdesk up: CYBERDESK_ON_EXIT={value!r} is not one of {', '.join(ON_EXIT_CHOICES)}", file=sys.stderr)
    raise SystemExit(2)


@dataclass
class Stack:
    """The running stack: its children, in start order."""

    options: StackOptions
    out: TextIO = field(default=sys.stdout)
    children: list[Child] = field(default_factory=list)
    redis_url: str = ""
    api_key: str = ""
    http_endpoint: str = ""
    stopping: bool = False
    lock_fd: int | None = None
    supervisor: Supervisor | None = None
    _pids_lock: threading.Lock = field(default_factory=threading.Lock)

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

    def _child(
        self, name: str, argv: list[str], env: dict[str, str] | None, ready: Callable[[Popen[bytes], Check], None]
    ) -> Child:
        """Start `argv` (logging to logs/<name>.log) and wait until `ready` says it serves."""
        log = self._logs() / f"{name}.log"

        def start() -> Popen[bytes]:
            if log.exists():
                # The log is shared by every run of the service: mark where this one begins.
                with open(log, "a") as out:
                    out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} started by cyberdesk up\n")
            return processes.spawn(argv, env, log, process_group=True)

        child = Child(name, log, start, ready, start())
        self.children.append(child)
        self._write_pids()
        ready(child.proc, self._check)
        return child

    def _write_pids(self) -> None:
        """<state>/pids.json: the current pid of each child, rewritten (atomically) after every restart."""
        path = self.options.state_dir / "pids.json"
        scratch = path.with_suffix(".tmp")
        with self._pids_lock:  # supervisor threads restart children concurrently
            pids = {"up": os.getpid(), **{c.name: c.proc.pid for c in self.children}}
            scratch.write_text(json.dumps(pids) + "\n")
            scratch.replace(path)

    def _stop_strays(self) -> None:
        """Stop the children an earlier `up` left running when it died without stopping them (kill -9).

        They keep their ports, so nothing could start; `pids.json` outlives such an `up`. A pid is
        taken for one of them only while its environment names this state directory (pids are
        reused). instance_svc gets SIGKILL, not SIGTERM: with `--on-exit end` a SIGTERM would end
        every instance, and the instances are to survive the death of `up` as they survive any
        other (the new instance_svc re-adopts them); the others get SIGTERM and drain.
        """
        path = self.options.state_dir / "pids.json"
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        strays = [
            (name, pid)
            for name, pid in reversed(list(recorded.items()))
            if name != "up" and isinstance(pid, int) and _runs_in(pid, self.options.state_dir)
        ]
        for name, pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL if name == "instance_svc" else signal.SIGTERM)
            deadline = time.monotonic() + _STOP_TIMEOUT
            while _runs_in(pid, self.options.state_dir):
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
        if strays:
            listed = ", ".join(f"{name} {pid}" for name, pid in strays)
            self._say(f"stopped what an earlier `cyberdesk up` (pid {recorded.get('up', '?')}) left running: {listed}")

    def _env(self) -> dict[str, str]:
        opts = self.options
        env = {
            "REDIS_URL": self.redis_url,
            "CYBERDESK_STATE_DIR": str(opts.state_dir),
            "CYBERDESK_GATEWAY_ADDR": opts.gateway_addr,
            "CYBERDESK_GATEWAY_HTTP_ADDR": opts.http_addr,
            "CYBERDESK_INSTANCE_ADDR": opts.instance_addr,
            "CYBERDESK_BILLING_ADDR": opts.billing_addr,
            "CYBERDESK_RUNTIME": opts.runtime,
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
        url = processes.redis_url(port, password)

        def ready(proc: Popen[bytes], check: Check) -> None:
            processes.wait_redis(url, proc, timeout=_READY_TIMEOUT, check=check)

        self.redis_url = url
        try:
            self._child("redis", argv, None, ready)
        except (RuntimeError, TimeoutError) as err:
            log = self._logs() / "redis.log"
            raise StackError(f"redis-server did not start on port {port} ({err}); see {log}") from None

    def _start_service(self, module: str, target: str, env: dict[str, str]) -> None:
        def ready(proc: Popen[bytes], check: Check) -> None:
            processes.wait_healthy(target, timeout=_READY_TIMEOUT, proc=proc, check=check)

        log = self._logs() / f"{module}.log"
        try:
            self._child(module, [sys.executable, "-m", module], env, ready)
        except RuntimeError:
            code = self.children[-1].proc.returncode
            raise StackError(f"{module} exited with code {code}:\n{tail(log)}") from None
        except TimeoutError:
            raise StackError(f"{module} did not become healthy on {target}; see {log}") from None

    def start(self) -> None:
        """Start Redis, then the services in dependency order, each once the one before answers."""
        needed = ("bwrap",) if self.options.runtime == "local" else ()
        missing = [b for b in needed if shutil.which(b) is None]
        if missing:
            raise StackError(f"missing {', '.join(missing)}: run `make setup` (it installs bubblewrap)")
        self.options.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock()
        self._stop_strays()
        self._start_redis()
        env = self._env()
        # instance_svc ends its instances on SIGTERM, or keeps them for the next start.
        on_shutdown = {"INSTANCE_SVC_ON_SHUTDOWN": self.options.on_exit}
        # Every create and SetTimeout asks billing_svc's plan first; without an answer they are
        # refused (UNAVAILABLE, retried by the SDKs) unless INSTANCE_SVC_BILLING says open or off.
        billing = {"INSTANCE_SVC_BILLING": os.environ.get("INSTANCE_SVC_BILLING", "") or "closed"}
        self._start_service("instance_svc", self.options.instance_addr, {**env, **on_shutdown, **billing})
        self._start_service("billing_svc", self.options.billing_addr, env)
        self._start_service("gateway_svc", self.options.gateway_addr, env)
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
        if self.options.on_exit == "end":
            print("Cyberdesk is running (Ctrl-C stops it and ends the instances)", file=p)
        else:
            print("Cyberdesk is running (Ctrl-C stops the services; instances keep running for the next `up`)", file=p)
        print(f"  gateway (gRPC)   {self.options.gateway_addr}", file=p)
        if self.http_endpoint:
            print(f"  gateway (HTTP)   {self.http_endpoint}", file=p)
        runtime = "" if self.options.runtime == "local" else f" (runtime {self.options.runtime})"
        print(f"  instance_svc     {self.options.instance_addr}{runtime}", file=p)
        print(f"  billing_svc      {self.options.billing_addr}", file=p)
        print(f"  redis            {mask_secrets(self.redis_url)}", file=p)
        print(f"  state directory  {self.options.state_dir} (logs in {self._logs()}, pids in pids.json)", file=p)
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
        """Supervise the children until a signal sets `stopping`; the exit code to return."""
        self.supervisor = Supervisor(self._say, self._write_pids)
        for child in self.children:
            self.supervisor.watch(child)
        while not self.stopping:
            time.sleep(0.2)
        return 0

    def _say(self, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Stop every child (gateway first, Redis last); end or keep the instances as `on_exit` says."""
        if self.lock_fd is None:
            return  # nothing of ours runs: the state directory belongs to another `up`
        if self.supervisor is not None:
            self.supervisor.halt()  # from here on nobody restarts anything: `child.proc` is final
        end = self.options.on_exit == "end"
        instance_svc_ended = False
        for child in reversed(self.children):
            proc = child.proc
            if child.name == "instance_svc":
                timeout = _INSTANCE_SVC_STOP_TIMEOUT
                if proc.poll() is not None:
                    self._say("instance_svc was not running at the stop")
                else:
                    if end:
                        print("ending the instances (instance_svc destroys their sandboxes)", file=self.out, flush=True)
                    proc.send_signal(signal.SIGTERM)
                    try:
                        instance_svc_ended = proc.wait(timeout) == 0
                    except subprocess.TimeoutExpired:
                        self._say(f"instance_svc did not exit within {timeout:g} s of SIGTERM; killing it")
                        proc.kill()
                        proc.wait()
                continue
            processes.stop(proc, _STOP_TIMEOUT)
        if self.options.runtime != "local":
            pass  # VMs live in the cluster: instance_svc ended them (end) or they run on (keep)
        elif end:
            # The last resort: what instance_svc did not end (it was killed, was down, or predates
            # INSTANCE_SVC_ON_SHUTDOWN). Their records become FAILED at the next start (sandbox gone).
            swept = sweep_sandboxes(self.options.state_dir)
            if swept:
                cause = "it exited" if instance_svc_ended else "it did not stop cleanly"
                print(f"destroyed {swept} sandbox(es) instance_svc left running ({cause})", file=self.out, flush=True)
        else:
            kept = _running_sandboxes(self.options.state_dir)
            print(
                f"{kept} sandbox(es) keep running; the next `cyberdesk up --state-dir {self.options.state_dir}` "
                "re-adopts them",
                file=self.out,
                flush=True,
            )
        if self.supervisor is not None:
            self.supervisor.join()
        with contextlib.suppress(OSError):
            (self.options.state_dir / "pids.json").unlink()
        os.close(self.lock_fd)
        self.lock_fd = None


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


def _running_sandboxes(state_dir: Path) -> int:
    """How many sandboxes of the local runtime under `state_dir` are running."""
    base = state_dir / "instances"
    if not base.is_dir():
        return 0
    from instance_svc.runtime.local import LocalRuntime

    async def count() -> int:
        runtime = LocalRuntime(base)
        try:
            return sum(info.running for info in await runtime.list())
        finally:
            await runtime.close()

    return asyncio.run(count())


def _runs_in(pid: int, state_dir: Path) -> bool:
    """Whether `pid` is a live process started for the stack of `state_dir`.

    A service has CYBERDESK_STATE_DIR in its environment; redis-server overwrites the memory that
    /proc/<pid>/environ shows (it rewrites its process title there), but it runs in its data
    directory under the state directory.
    """
    proc = Path(f"/proc/{pid}")
    try:
        if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        if f"CYBERDESK_STATE_DIR={state_dir}".encode() in (proc / "environ").read_bytes().split(b"\0"):
            return True
        return Path(os.readlink(proc / "cwd")).is_relative_to(state_dir)
    except (OSError, IndexError):
        return False


def _listening(addr: str) -> bool:
    import socket

    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except (OSError, ValueError):
        return False


def run(options: StackOptions, out: TextIO = sys.stdout) -> int:
    """Start the stack, supervise it until SIGINT/SIGTERM, stop it as `options.on_exit` says. Returns the exit code."""
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
