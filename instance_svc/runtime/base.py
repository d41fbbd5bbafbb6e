"""The contract between instance_svc and whatever runs instances.

It is declarative-friendly: `create` returns once the machine's agent answers, however the runtime
gets there (spawn a sandbox here; write a custom resource and watch its status for KubeVirt), so
callers never change when the runtime does. Sandboxes have their own id: a warm-pool sandbox
exists before the instance that will claim it.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# The reason `Runtime.watch` reports when the platform itself ended a sandbox at its deadline (the
# kubevirt operator's timer): the lifecycle ends such an instance TERMINATED, not FAILED.
EXPIRED = "expired at its deadline"


class RuntimeError_(Exception):
    """A runtime operation failed; the message is meant for the instance's state_message."""


class Unsupported(RuntimeError_):
    """The runtime cannot do this (e.g. pause without a freezer); maps to FAILED_PRECONDITION."""


@dataclass(frozen=True)
class AgentEndpoint:
    """How to reach a sandbox's guest agent."""

    target: str  # "unix:///abs/path/agent.sock" or "host:port" (TLS)
    token: str
    ca_pem: str = ""
    server_name: str = ""


@dataclass(frozen=True)
class Limit:
    """A resource limit and how it is really enforced ("cgroup", "rlimit", "filesystem" or "none")."""

    name: str
    value: int
    mechanism: str


@dataclass(frozen=True)
class SandboxSpec:
    """What to start."""

    sandbox_id: str
    template: str = "base"
    vcpus: int = 1
    memory_mib: int = 512
    # Size of the writable layer (home, tmp, var, ...); the local runtime makes it a file system of its own.
    disk_mib: int = 2048
    # Bound at start for a direct create; empty for a warm-pool sandbox (bound at claim).
    instance_id: str = ""
    env: dict[str, str] = field(default_factory=dict)
    desktop: tuple[int, int] | None = None  # (width, height) of the X screen, None for no desktop
    internet: bool = False
    # Egress of an INTERNET sandbox on top of the fixed denials (validated: CIDRs, addresses, host
    # names, "*.example.com"); empty allow = every public address.
    egress_allow: tuple[str, ...] = ()
    egress_deny: tuple[str, ...] = ()
    # The template asks for nested user namespaces (rootless containers inside); off by default.
    nested_userns: bool = False
    # Archive written by `snapshot` to restore the writable layer from.
    restore_from: Path | None = None


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox that exists."""

    sandbox_id: str
    endpoint: AgentEndpoint
    running: bool
    paused: bool = False
    limits: tuple[Limit, ...] = ()


@dataclass(frozen=True)
class SnapshotResult:
    """What `snapshot` wrote."""

    path: Path
    size_bytes: int
    includes_memory: bool


class Runtime(Protocol):
    """Runs sandboxes. Every method is idempotent where that makes sense (delete of a gone sandbox)."""

    name: str
    supports_pause: bool

    async def create(self, spec: SandboxSpec) -> SandboxInfo:
        """Start a sandbox and return once its agent answers health checks."""
        ...

    async def delete(self, sandbox_id: str) -> None:
        """Stop a sandbox and remove its files; a sandbox that is already gone is not an error."""
        ...

    async def pause(self, sandbox_id: str) -> None:
        """Freeze every process of the sandbox (Unsupported where the host cannot)."""
        ...

    async def resume(self, sandbox_id: str) -> None:
        """Thaw a paused sandbox."""
        ...

    async def snapshot(self, sandbox_id: str, dest: Path) -> SnapshotResult:
        """Archive the sandbox's writable layer to `dest` (pausing it meanwhile where possible)."""
        ...

    async def list(self) -> list[SandboxInfo]:
        """The sandboxes that exist now, for re-adoption after a restart of instance_svc."""
        ...

    async def sweep(self, keep: Collection[str]) -> builtins.list[str]:
        """Destroy every sandbox but `keep`, found on the host rather than in any record; the ids destroyed.

        The start-up reconciliation's cleanup: whatever a create, delete or warm-pool refill cut
        short by a crash of instance_svc left behind (processes, files, cgroups, mounts).
        """
        ...

    def watch(self, sandbox_id: str, on_exit: Callable[[str, str], None]) -> None:
        """Call `on_exit(sandbox_id, reason)` on the event loop once the sandbox dies by itself (once).

        A `delete` ends the watch first; a sandbox already gone is reported at once.
        """
        ...

    async def close(self) -> None:
        """Release the runtime's own resources (not the sandboxes: they outlive instance_svc)."""
        ...
