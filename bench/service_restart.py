"""`cyberdesk up` under kill -9: from the kill of one service to serving again, per service.

A real `cyberdesk up` (free ports, a temporary state directory, no warm pool) runs one instance.
One sample kills one child (its pid from `<state>/pids.json`) with SIGKILL and then measures,
from the kill:

- "healthy": the service answers its own health check again (gRPC health SERVING; PING with the
  password for Redis), i.e. the supervisor noticed, waited its back-off (0.1 s after a healthy
  run) and the new process started;
- "GetInstance ok" and "exec ok": the first GetInstance and the first exec of `true` in the
  existing instance that succeed through the gateway (the SDK, a 2 s deadline per attempt,
  attempts back to back). A call that does not need the killed service may succeed at once.

The services are killed in turn, and one service is killed again only 31 s after it came back:
the supervisor's back-off starts over after 30 s healthy, so every sample is a first restart, not
one inside a crash loop. BENCH_N samples per service (default 5).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench._report import latency_summary, report
from cyberdesk import Cyberdesk, CyberdeskError
from cyberdesk_stack.processes import free_port, redis_url

N = int(os.environ.get("BENCH_N", "5"))
SERVICES = ("instance_svc", "gateway_svc", "billing_svc", "redis")
_SPACING = 31.0  # s between two kills of one service (Backoff.reset_after is 30 s)
_GIVE_UP = 60.0


class _Up:
    """`cyberdesk up` in a temporary state directory, its output drained into a buffer."""

    def __init__(self) -> None:
        # A short state path: agent sockets live under it (unix socket paths hold at most 107 bytes).
        self.state = Path(tempfile.mkdtemp(prefix="cdb-", dir="/tmp")) / "state"
        self.ports = {name: free_port() for name in ("gateway", "http", "instance", "billing", "redis")}
        script = Path(sys.executable).parent / "cyberdesk"
        argv = [
            str(script), "up", "--no-config",
            "--state-dir", str(self.state),
            "--gateway-addr", f"127.0.0.1:{self.ports['gateway']}",
            "--http-addr", f"127.0.0.1:{self.ports['http']}",
            "--instance-addr", f"127.0.0.1:{self.ports['instance']}",
            "--billing-addr", f"127.0.0.1:{self.ports['billing']}",
            "--redis-port", str(self.ports["redis"]),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("CYBERDESK_") and k != "REDIS_URL"}
        env.update({"CYBERDESK_WARM_POOL": "base=0,desktop=0", "CYBERDESK_LOG_LEVEL": "WARNING"})
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 120
        while b"Try: cyberdesk create" not in self.output:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"cyberdesk up did not start:\n{self.output.decode(errors='replace')}")
            time.sleep(0.1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.output += chunk

    def pids(self) -> dict[str, int]:
        pids: dict[str, int] = json.loads((self.state / "pids.json").read_text())
        return pids

    def client(self) -> Cyberdesk:
        key = (self.state / "dev_api_key").read_text().strip()
        return Cyberdesk(api_key=key, endpoint=f"127.0.0.1:{self.ports['gateway']}", timeout=2)

    def healthy(self, name: str) -> bool:
        """One health check of `name` (no retry)."""
        if name == "redis":
            password = (self.state / "redis_password").read_text().strip()
            client = redis.Redis.from_url(redis_url(self.ports["redis"], password), socket_timeout=1)
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False
            finally:
                client.close()
        port = self.ports[{"instance_svc": "instance", "gateway_svc": "gateway", "billing_svc": "billing"}[name]]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        # Its instances ended with it (--on-exit end): nothing of the stack is left in the directory.
        shutil.rmtree(self.state.parent, ignore_errors=True)


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _ok(call: Callable[[], object]) -> bool:
    try:
        call()
    except (CyberdeskError, grpc.RpcError):
        return False
    return True


def _sample(up: _Up, client: Cyberdesk, instance_id: str, name: str) -> dict[str, float]:
    """Kill `name`; ms from the kill to healthy, to a GetInstance and to an exec through the gateway."""
    pid = up.pids()[name]
    killed = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    while not _dead(pid):  # the old process must not answer the first health check
        time.sleep(0.001)
    inst = client.instances.handle(instance_id)
    checks: dict[str, Callable[[], bool]] = {
        "healthy": lambda: up.healthy(name),
        "GetInstance ok": lambda: _ok(lambda: client.instances.get(instance_id)),
        "exec ok": lambda: _ok(lambda: inst.exec("true")),
    }
    marks: dict[str, float] = {}

    def until_ok(series: str, check: Callable[[], bool]) -> None:
        # Each series in its own thread: a call stuck on its deadline must not delay the others.
        while time.perf_counter() - killed < _GIVE_UP:
            if check():
                marks[series] = (time.perf_counter() - killed) * 1000
                return
            time.sleep(0.005)

    threads = [threading.Thread(target=until_ok, args=item) for item in checks.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if missing := sorted(checks.keys() - marks.keys()):
        raise RuntimeError(f"{name}: {missing} not ok {_GIVE_UP:g} s after kill -9")
    return {series: marks[series] for series in checks}


def main() -> None:
    up = _Up()
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        with up.client() as client:
            instance_id = client.instances.create(timeout=3600).id
            back: dict[str, float] = {}
            for _ in range(N):
                for name in SERVICES:
                    wait = back.get(name, 0.0) + _SPACING - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    for series, ms in _sample(up, client, instance_id, name).items():
                        samples.setdefault((name, series), []).append(ms)
                    back[name] = time.monotonic()
                    done = ", ".join(f"{s[1]} {v[-1]:.0f} ms" for s, v in samples.items() if s[0] == name)
                    print(f"  {name}: {done}", flush=True)
            # The supervisor announces a restart after its own health check, which may come a
            # moment after this benchmark's.
            kills = N * len(SERVICES)
            deadline = time.monotonic() + 15
            while up.output.count(b" is back (pid ") < kills and time.monotonic() < deadline:
                time.sleep(0.1)
            restarts = up.output.count(b" is back (pid ")
            alive = up.proc.poll() is None
            if restarts != kills:
                print(up.output.decode(errors="replace"), file=sys.stderr)
    finally:
        up.stop()
    rows = [{"service": name, "series": series, **latency_summary(ms)} for (name, series), ms in samples.items()]
    report(
        "service_restart",
        rows,
        note=(
            "ms from kill -9 of one child of `cyberdesk up` (a first restart: back-off 0.1 s) to its health "
            "check answering, and to the first GetInstance / exec `true` of an existing instance succeeding "
            "through the gateway (2 s deadline per attempt)"
        ),
        kills=kills,
        restarts_announced=restarts,
        load_average_at_end=[round(v, 2) for v in os.getloadavg()],
        up_still_running_after_all_kills=alive,
    )


if __name__ == "__main__":
    main()
