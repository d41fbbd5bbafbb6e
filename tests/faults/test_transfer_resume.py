"""Transfers cut by a gateway restart resume where they were and end verified by the whole file's sha256.

Real processes only: instance_svc with a real sandbox, the gateway killed with SIGKILL mid-transfer
and started again on the same port, and the real clients: the `cyberdesk cp` command for the
download, the SDK for the upload. That they resumed (did not start again from byte 0) is read from
what they report: the SDK logs "resuming ... from byte N" on the `cyberdesk.files` logger, and
the CLI prints those lines on stderr.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cyberdesk import Instance
from tests.cli.stack import CLI
from tests.faults.stack import Stack

TENANT = "t-resume"

pytestmark = pytest.mark.timeout(240)

MiB = 1024 * 1024
SIZE = 256 * MiB  # big enough to be mid-transfer when the gateway dies, well within the 2048 MiB default disk
CUT_AFTER = 32 * MiB


def _restart_gateway_when(stack: Stack, reached: object, what: str) -> None:
    """Kill -9 the gateway once `reached()` is true, then start it again on the same port."""
    deadline = time.monotonic() + 120
    while not reached():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"the transfer never reached {what}"
        time.sleep(0.01)
    stack.gateway.kill9()
    stack.gateway.start()


def _resumed_from(text: str, verb: str) -> list[int]:
    return [int(n) for n in re.findall(rf"resuming the {verb} [^\n]* from byte (\d+)", text)]


def test_cli_download_resumes_after_a_gateway_restart(stack: Stack, key: str, box: Instance, tmp_path: Path) -> None:
    remote = "/home/user/big-download.bin"
    made = box.exec(f"head -c {SIZE} /dev/urandom > {remote} && sha256sum {remote}")
    assert made.exit_code == 0, made.stderr
    expected = made.stdout.split()[0].decode()
    local = tmp_path / "big.bin"
    partial = local.with_name(f".{local.name}.partial")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYBERDESK_")}
    env.update({"CYBERDESK_API_KEY": key, "CYBERDESK_ENDPOINT": stack.gateway.addr, "CYBERDESK_CONFIG": "/nonexistent"})
    cli = subprocess.Popen(
        [CLI, "cp", f"{box.id}:{remote}", str(local)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:

        def cut_point() -> bool:
            if cli.poll() is not None:
                raise AssertionError(f"cp ended before the cut: {cli.communicate()}")
            return partial.exists() and partial.stat().st_size >= CUT_AFTER

        _restart_gateway_when(stack, cut_point, f"{CUT_AFTER} bytes")
        stdout, stderr = cli.communicate(timeout=180)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, stderr.decode()
    assert f"sha256 {expected}" in stdout.decode()
    with open(local, "rb") as got:
        assert hashlib.file_digest(got, "sha256").hexdigest() == expected
    text = stderr.decode()
    assert "interrupted at byte" in text, text
    offsets = [int(n) for n in re.findall(r"interrupted at byte (\d+)", text)]
    assert offsets and min(offsets) >= CUT_AFTER, text  # resumed from where it was, not from byte 0
    assert not partial.exists()


def test_sdk_upload_resumes_after_a_gateway_restart(
    stack: Stack, key: str, box: Instance, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    local = tmp_path / "up.bin"
    with open(local, "wb") as out:
        for _ in range(SIZE // (16 * MiB)):
            out.write(os.urandom(16 * MiB))
    with open(local, "rb") as src:
        expected = hashlib.file_digest(src, "sha256").hexdigest()
    remote = "/home/user/big-upload.bin"
    done = [0]
    result: list[object] = []

    def upload() -> None:
        try:
            result.append(box.files.upload(local, remote, progress=lambda n, total: done.__setitem__(0, n)))
        except BaseException as err:  # reported by the test, not lost in the thread
            result.append(err)

    caplog.set_level(logging.WARNING, logger="cyberdesk.files")
    worker = threading.Thread(target=upload, daemon=True)
    worker.start()
    _restart_gateway_when(stack, lambda: done[0] >= CUT_AFTER or result, f"{CUT_AFTER} bytes")
    worker.join(180)
    assert result and not isinstance(result[0], BaseException), result
    uploaded = result[0]
    assert (uploaded.size, uploaded.sha256) == (SIZE, expected)  # type: ignore[attr-defined]
    summed = box.exec(f"sha256sum {remote}")
    assert summed.exit_code == 0 and summed.stdout.split()[0].decode() == expected
    offsets = _resumed_from(caplog.text, "upload")
    assert offsets and max(offsets) > 0, caplog.text  # the instance kept bytes and the SDK went on from them
    # No partial file is left beside the target once the resumed upload committed.
    assert not [e.name for e in box.files.list("/home/user") if ".cyberdesk-upload-" in e.name]
