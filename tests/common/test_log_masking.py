"""cyberdesk_common.log's masks: the state directory's paths in a tenant's message."""

from __future__ import annotations

import os
from pathlib import Path

from cyberdesk_common.log import mask_paths


def test_paths_under_the_state_directory_become_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    link = tmp_path / "link"
    os.symlink(state, link)
    text = f"cannot restore {state}/snapshots/s-1.tar: tar: {link}/instances/sb-1/x: Cannot open"
    masked = mask_paths(text, link)
    assert masked == "cannot restore <state>/snapshots/s-1.tar: tar: <state>/instances/sb-1/x: Cannot open"
    assert str(tmp_path) not in masked
    # Paths elsewhere (the tenant's own, inside the instance) are left alone.
    assert mask_paths("/home/user/x: no such file", state) == "/home/user/x: no such file"
