"""Guests for the virt-controller stand-in: a real guest agent per VM, started as the VM would start it.

In a VM, cloud-init reads the user data from the VM's Secret (cloudInitNoCloud.secretRef), writes
the agent's token, certificate and key and its environment file, and systemd starts the agent with
that environment. `AgentGuests.boot` does the same on this host: it parses the Secret's `userdata`
cloud-config, writes its `write_files` under the VM's own directory (paths re-rooted there), reads
the environment file, and runs `python -m guest_agent` with it, listening with TLS on a loopback
address of its own (127.77.x.y) on the port the VM's agent would use. Pause and unpause freeze and
thaw the agent (SIGSTOP/SIGCONT, as a paused domain stops running); a snapshot copies the VM's home
directory (its disk), and a VM restored from that snapshot starts with the copy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cyberdesk_stack import processes


@dataclass
class GuestVM:
    """One booted guest."""

    namespace: str
    name: str
    address: str
    port: int
    root: Path
    proc: subprocess.Popen[bytes] | None
    env: dict[str, str]

    @property
    def target(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def log(self) -> str:
        path = self.root / "guest_agent.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _decode(entry: dict[str, Any]) -> bytes:
    content = entry.get("content", "")
    enc = (entry.get("encoding") or "").lower()
    if enc in ("b64", "base64"):
        return base64.b64decode(content)
    return str(content).encode()


def parse_env_file(text: str) -> dict[str, str]:
    """A systemd EnvironmentFile: KEY=VALUE lines, '#' comments, optional double quotes."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        env[key.strip()] = value
    return env


class AgentGuests:
    """Real guest agents for the VMs, under `workdir/<namespace>/<vm>/`.

    `env_file` is where the cloud-config writes the agent's environment (contract.GUEST_ENV_FILE);
    `network=None` picks addresses from 127.77.0.0/16 in order.
    """

    def __init__(self, workdir: Path, env_file: str = "/etc/cyberdesk/agent.env", first: str = "127.77.0.2") -> None:
        self.workdir = workdir
        self.env_file = env_file
        self._next = ipaddress.ip_address(first)
        self.vms: dict[tuple[str, str], GuestVM] = {}
        self.snapshots: dict[str, Path] = {}
        self.boots: list[tuple[str, str]] = []
        self.extra_env: dict[str, str] = {"DISPLAY": ""}

    def _address(self) -> str:
        address = str(self._next)
        self._next += 1
        return address

    async def boot(
        self, vmi: dict[str, Any], cloud_init_secret: dict[str, Any] | None, restored_from: str | None
    ) -> str:
        ns, name = vmi["metadata"]["namespace"], vmi["metadata"]["name"]
        await self.shutdown(ns, name)
        root = self.workdir / ns / name
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        home = root / "home"
        if restored_from and restored_from in self.snapshots:
            shutil.copytree(self.snapshots[restored_from], home)
        home.mkdir(exist_ok=True)
        address = self._address()
        self.boots.append((ns, name))
        if cloud_init_secret is None:
            self.vms[(ns, name)] = GuestVM(ns, name, address, 0, root, None, {})
            return address
        data = cloud_init_secret.get("data") or {}
        raw = data.get("userdata") or data.get("userData")
        if raw is None:
            self.vms[(ns, name)] = GuestVM(ns, name, address, 0, root, None, {})
            return address
        config = yaml.safe_load(base64.b64decode(raw).decode())
        files: dict[str, Path] = {}
        for entry in (config or {}).get("write_files") or []:
            path = root / "fs" / entry["path"].lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_decode(entry))
            os.chmod(path, int(str(entry.get("permissions", "0644")), 8))
            files[entry["path"]] = path
        env = parse_env_file(files[self.env_file].read_text()) if self.env_file in files else {}
        # The file paths the environment names are the guest's; here they live under root/fs.
        for key, value in list(env.items()):
            if value in files:
                env[key] = str(files[value])
        listen = env.get("CYBERDESK_AGENT_LISTEN", "0.0.0.0:49983")
        port = int(listen.rsplit(":", 1)[1])
        env["CYBERDESK_AGENT_LISTEN"] = f"{address}:{port}"
        env["HOME"] = str(home)
        env.update(self.extra_env)
        proc = processes.spawn([sys.executable, "-m", "guest_agent"], env, root / "guest_agent.log")
        self.vms[(ns, name)] = GuestVM(ns, name, address, port, root, proc, env)
        return address

    async def shutdown(self, namespace: str, name: str) -> None:
        vm = self.vms.pop((namespace, name), None)
        if vm is not None and vm.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                vm.proc.send_signal(signal.SIGCONT)
            await asyncio.to_thread(processes.stop, vm.proc, 5.0)

    async def pause(self, namespace: str, name: str) -> None:
        vm = self.vms.get((namespace, name))
        if vm is not None and vm.proc is not None and vm.proc.poll() is None:
            vm.proc.send_signal(signal.SIGSTOP)

    async def unpause(self, namespace: str, name: str) -> None:
        vm = self.vms.get((namespace, name))
        if vm is not None and vm.proc is not None and vm.proc.poll() is None:
            vm.proc.send_signal(signal.SIGCONT)

    async def snapshot(self, namespace: str, name: str, content: str) -> int:
        vm = self.vms.get((namespace, name))
        dest = self.workdir / "snapshots" / content
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if vm is None:
            dest.mkdir()
        else:
            await asyncio.to_thread(shutil.copytree, vm.home, dest, symlinks=True)
        self.snapshots[content] = dest
        return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())

    async def close(self) -> None:
        await asyncio.gather(*(self.shutdown(ns, name) for ns, name in list(self.vms)))
