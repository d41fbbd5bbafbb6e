"""`<base>/<sandbox_id>/state.json`: what re-adopting a sandbox after a restart of instance_svc needs.

Written 0600 through a temporary file and a rename, so a crash leaves the old file or the new
one, never half of one. It holds the agent token (which therefore never exists inside the
sandbox) and the spec without env values (they may be secrets and are not needed again).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instance_svc.runtime.base import SandboxSpec
from instance_svc.runtime.local.cgroups import SandboxCgroups

STATE_FILE = "state.json"


@dataclass
class SandboxState:
    """What state.json holds."""

    sandbox_id: str
    pid: int  # the outer bubblewrap, our child while we live
    pid_start: int  # its start time in clock ticks: guards against pid reuse
    init_pid: int  # the sandbox's PID 1 (the agent) as the host sees it
    token: str
    spec: dict[str, Any]
    cgroup_version: int = 0
    cgroups: dict[str, str] = field(default_factory=dict)
    limits: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False  # paused with SIGSTOP (no freezer)
    created_at: float = 0.0

    def sandbox_cgroups(self) -> SandboxCgroups:
        """The sandbox's cgroups, as recorded."""
        return SandboxCgroups(version=self.cgroup_version, paths=dict(self.cgroups))


def spec_json(spec: SandboxSpec) -> dict[str, Any]:
    """The spec as recorded: env names only, the restore archive as a string."""
    raw = dataclasses.asdict(spec)
    raw["restore_from"] = str(spec.restore_from) if spec.restore_from else None
    raw["env"] = sorted(spec.env)  # names only: values may be secrets and are not needed again
    raw["egress_allow"], raw["egress_deny"] = list(spec.egress_allow), list(spec.egress_deny)  # as JSON reads back
    return raw


def load(directory: Path) -> SandboxState | None:
    """The state of the sandbox in `directory`, or None when it has no (readable) state file."""
    try:
        raw = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    # Unknown keys are dropped: a file written by a newer instance_svc still loads.
    names = {f.name for f in dataclasses.fields(SandboxState)}
    return SandboxState(**{k: v for k, v in raw.items() if k in names})


def save(directory: Path, state: SandboxState) -> None:
    """Replace the state file atomically (0600)."""
    tmp = directory / (STATE_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(dataclasses.asdict(state), f)
    os.replace(tmp, directory / STATE_FILE)
