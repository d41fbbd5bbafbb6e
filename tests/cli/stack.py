"""`cyberdesk up` on free ports and a temporary state directory, as a user would start it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import ROOT, free_port

# The console script `pip install` made, as a user runs it (the one beside this interpreter otherwise).
_SCRIPT = ROOT / ".venv" / "bin" / "cyberdesk"
CLI = str(_SCRIPT if _SCRIPT.exists() else Path(sys.executable).parent / "cyberdesk")


@dataclass
class RunningStack:
    """A stack started by `cyberdesk up` and the environment a CLI user would have."""

    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    state_dir: Path
    config: Path
    gateway: str
    output: bytearray

    def cli(self, *args: str, input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """Run `cyberdesk ARGS` and return its result (never raises on a non-zero exit)."""
        return subprocess.run([CLI, *args], env=self.env, input=input, capture_output=True, timeout=timeout)

    def env_config(self) -> dict[str, str]:
        """The CLI config file `cyberdesk up` wrote."""
        import json

        data: dict[str, str] = json.loads(self.config.read_text())
        return data

    def stop(self) -> int:
        """Ctrl-C, as a user would; returns the launcher's exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.output += self.proc.stdout.read()
            self.proc.stdout.close()
        return code

    def leftovers(self) -> list[str]:
        """Processes whose command line still names the state directory (sandboxes, services, redis)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(self.state_dir) in cmdline:
                found.append(f"{entry.name}: {cmdline[:200]}")
        return found


@contextmanager
def running_stack(tmp: Path, extra_env: Mapping[str, str] | None = None) -> Iterator[RunningStack]:
    """Start `cyberdesk up` and wait for its banner; Ctrl-C it when the block ends.

    `extra_env` reaches every service (the launcher passes its environment on), e.g. a gateway setting.
    """
    state = tmp / "state"
    config = tmp / "config" / "config.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYBERDESK_") and k != "REDIS_URL"}
    env.update({"CYBERDESK_CONFIG": str(config), "CYBERDESK_WARM_POOL": "base=1,desktop=0"})
    env.update(extra_env or {})
    gateway = f"127.0.0.1:{free_port()}"
    argv = [
        CLI, "up",
        "--state-dir", str(state),
        "--gateway-addr", gateway,
        "--http-addr", f"127.0.0.1:{free_port()}",
        "--instance-addr", f"127.0.0.1:{free_port()}",
        "--billing-addr", f"127.0.0.1:{free_port()}",
        "--redis-port", str(free_port()),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = bytearray()
    stack = RunningStack(proc, env, state, config, gateway, output)
    deadline = time.monotonic() + 100
    try:
        while b"Try: cyberdesk create" not in output:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cyberdesk up did not start:\n{output.decode(errors='replace')}")
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                output += os.read(proc.stdout.fileno(), 65536)
        yield stack
    finally:
        stack.stop()
