"""The sandbox state file (instance_svc/runtime/local/state_file.py): atomic 0600 writes, tolerant reads."""

from __future__ import annotations

import json
from pathlib import Path

from instance_svc.runtime.base import SandboxSpec
from instance_svc.runtime.local import state_file
from instance_svc.runtime.local.state_file import SandboxState


def _state() -> SandboxState:
    spec = SandboxSpec(sandbox_id="sb-a", env={"API_KEY": "secret-value"}, restore_from=Path("/snaps/s-1.tar"))
    return SandboxState(
        sandbox_id="sb-a",
        pid=10,
        pid_start=20,
        init_pid=11,
        token="tok",
        spec=state_file.spec_json(spec),
        cgroup_version=2,
        cgroups={"unified": "/sys/fs/cgroup/cyberdesk/sb-a"},
    )


def test_round_trip_is_0600_and_keeps_env_names_but_not_values(tmp_path: Path) -> None:
    state = _state()
    state_file.save(tmp_path, state)
    path = tmp_path / "state.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "state.json.tmp").exists()
    assert state_file.load(tmp_path) == state
    assert "secret-value" not in path.read_text()
    assert state.spec["env"] == ["API_KEY"] and state.spec["restore_from"] == "/snaps/s-1.tar"
    cg = state.sandbox_cgroups()
    assert cg.version == 2 and cg.paths == {"unified": "/sys/fs/cgroup/cyberdesk/sb-a"} and cg.can_freeze


def test_missing_or_broken_files_load_as_none_and_unknown_keys_are_ignored(tmp_path: Path) -> None:
    assert state_file.load(tmp_path) is None
    (tmp_path / "state.json").write_text("{not json")
    assert state_file.load(tmp_path) is None
    raw = {"sandbox_id": "sb-b", "pid": 1, "pid_start": 2, "init_pid": 3, "token": "t", "spec": {}, "later": 1}
    (tmp_path / "state.json").write_text(json.dumps(raw))
    loaded = state_file.load(tmp_path)
    assert loaded is not None and loaded.sandbox_id == "sb-b" and not loaded.stopped
