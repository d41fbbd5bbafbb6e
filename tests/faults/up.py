"""`cyberdesk up` as a user runs it, for the fault tests that kill its children under it.

`Up` starts `cyberdesk up` on free ports in a state directory of the test's own and keeps reading
its output in a thread (the supervisor reports deaths and restarts after the banner; an undrained
pipe would block it). A second `Up` on the same state directory is the "next `up`" of a user.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cyberdesk import Cyberdesk
from tests.cli.stack import CLI
from tests.support.procs import free_port

_START_TIMEOUT = 120.0


class Up:
    """One `cyberdesk up` process; `output` is everything it printed so far (stdout and stderr)."""

    def __init__(self, state_dir: Path, *, on_exit: str | None = None, ports: dict[str, int] | None = None) -> None:
        self.state_dir = state_dir
        self.ports = ports or {name: free_port() for name in ("gateway", "http", "instance", "billing", "redis")}
        self.gateway = f"127.0.0.1:{self.ports['gateway']}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CYBERDESK_") and k != "REDIS_URL"}
        env["CYBERDESK_WARM_POOL"] = "base=0,desktop=0"  # no pool: a kill test counts only its own sandboxes
        argv = [
            CLI, "up", "--no-config",
            "--state-dir", str(state_dir),
            "--gateway-addr", self.gateway,
            "--http-addr", f"127.0.0.1:{self.ports['http']}",
            "--instance-addr", f"127.0.0.1:{self.ports['instance']}",
            "--billing-addr", f"127.0.0.1:{self.ports['billing']}",
            "--redis-port", str(self.ports["redis"]),
        ]  # fmt: skip
        if on_exit is not None:
            argv += ["--on-exit", on_exit]
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._output = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.wait_output("Try: cyberdesk create", _START_TIMEOUT)
        except BaseException:
            self.stop(signal.SIGTERM)
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            with self._lock:
                self._output += chunk

    @property
    def output(self) -> str:
        """What `up` printed so far."""
        with self._lock:
            return self._output.decode(errors="replace")

    def wait_output(self, text: str, timeout: float, after: int = 0) -> None:
        """Block until `text` appears in the output past offset `after`; fail with the output otherwise."""
        deadline = time.monotonic() + timeout
        while text not in self.output[after:]:
            if self.proc.poll() is not None and text not in self.output[after:]:
                self._reader.join(5)
                if text in self.output[after:]:
                    return
                pytest.fail(f"`cyberdesk up` exited ({self.proc.returncode}) before printing {text!r}:\n{self.output}")
            if time.monotonic() > deadline:
                pytest.fail(f"`cyberdesk up` did not print {text!r} within {timeout:g} s:\n{self.output}")
            time.sleep(0.1)

    def client(self) -> Cyberdesk:
        """An SDK client with the development key `up` made."""
        key = (self.state_dir / "dev_api_key").read_text().strip()
        return Cyberdesk(api_key=key, endpoint=self.gateway, timeout=60)

    def pids(self) -> dict[str, int]:
        """<state>/pids.json: the current pid of every child."""
        pids: dict[str, int] = json.loads((self.state_dir / "pids.json").read_text())
        return pids

    def stop(self, sig: int = signal.SIGINT, timeout: float = 90) -> int:
        """Ctrl-C (or `sig`), as a user would; returns the launcher's exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code
