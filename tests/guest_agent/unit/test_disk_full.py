"""A full disk in the agent's messages (guest_agent/fs_errors.py): the instance's disk, with its size."""

from __future__ import annotations

import errno

import grpc
import pytest

from guest_agent.fs_errors import os_error


@pytest.mark.parametrize(
    ("code", "text"), [(errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota exceeded")]
)
def test_a_full_disk_names_the_instances_disk_and_its_size(
    monkeypatch: pytest.MonkeyPatch, code: int, text: str
) -> None:
    monkeypatch.setenv("CYBERDESK_AGENT_DISK_MIB", "256")
    err = os_error(OSError(code, "raw"), "/home/user/f", "write")
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.message == f"cannot write /home/user/f: the instance's disk (256 MiB) is full ({text})"


def test_without_a_size_from_the_runtime_the_systems_text_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CYBERDESK_AGENT_DISK_MIB", raising=False)
    err = os_error(OSError(errno.ENOSPC, "raw"), "/data/f", "write")
    assert (err.code, err.message) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "cannot write /data/f: no space left on device",
    )
    monkeypatch.setenv("CYBERDESK_AGENT_DISK_MIB", "not-a-number")
    assert os_error(OSError(errno.ENOSPC, "raw"), "/data/f", "write").message.endswith(": no space left on device")
