"""`make run`: start the whole local stack in the foreground; Ctrl-C stops all of it.

Redis gets its own process and data directory under the state directory unless REDIS_URL is
given. Every service is a child process; on Ctrl-C or SIGTERM each gets SIGTERM (and a grace
period to drain) before anything is killed, so no process is left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cyberdesk_common.config import state_dir  # noqa: E402

SERVICES = [
    ("instance_svc", "CYBERDESK_INSTANCE_ADDR", "127.0.0.1:50061"),
    ("billing_svc", "CYBERDESK_BILLING_ADDR", "127.0.0.1:50071"),
    ("gateway_svc", "CYBERDESK_GATEWAY_ADDR", "127.0.0.1:50051"),
]


def _start_redis(base: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    url = os.environ.get("REDIS_URL")
    if url:
        return None, url
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: run `make setup` (or set REDIS_URL)")
    data = base / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = os.environ.get("CYBERDESK_REDIS_PORT", "6390")
    proc = subprocess.Popen(
        [binary, "--port", port, "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes"],
        stdout=subprocess.DEVNULL,
    )
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> int:
    base = state_dir()
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    redis_proc, redis_url = _start_redis(base)
    if redis_proc is not None:
        children.append(("redis-server", redis_proc))
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), "CYBERDESK_STATE_DIR": str(base)}
    for module, var, default in SERVICES:
        env.setdefault(var, default)
        children.append((module, subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env=env)))
    print("Cyberdesk is running (Ctrl-C stops everything):", flush=True)
    print(f"  redis           {redis_url}")
    for module, var, _ in SERVICES:
        print(f"  {module:<15} grpc://{env[var]}")
    print(f"  state directory {base}", flush=True)

    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    code = 0
    while not stopping:
        for name, proc in children:
            if proc.poll() is not None:
                print(f"{name} exited with {proc.returncode}; stopping the stack", file=sys.stderr)
                stopping, code = True, 1
                break
        time.sleep(0.2)
    # Services first (they may still talk to Redis while draining), Redis last.
    for _name, proc in reversed(children):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print("stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
