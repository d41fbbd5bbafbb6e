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


def test_a_full_disk_carries_an_error_info_so_rest_can_say_507(monkeypatch: pytest.MonkeyPatch) -> None:
    from google.rpc import error_details_pb2

    from gateway_svc.rest.http_errors import from_rpc_error

    monkeypatch.setenv("CYBERDESK_AGENT_DISK_MIB", "256")
    err = os_error(OSError(errno.ENOSPC, "raw"), "/home/user/f", "write")
    (detail,) = err.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == ("DISK_FULL", "cyberdesk.dev", {"disk_mib": "256"})
    http = from_rpc_error(err)
    assert http.status == 507 and "Retry-After" not in http.headers
    # Any other RESOURCE_EXHAUSTED (a rate limit, a quota) stays 429; other errnos carry no detail.
    assert from_rpc_error(os_error(OSError(errno.EMFILE, "raw"), "/f", "open")).status == 429
    assert os_error(OSError(errno.EROFS, "raw"), "/usr/f", "write").details == []
