"""The SDK distribution alone: what its wheel holds and requires, and that its CLI drives a stack.

The wheel is built from `sdk/python` as a user's `pip install` would build it (without build
isolation: tests send no traffic to a package index). The CLI then runs from the unpacked wheel
with every server-side package made unimportable, so a stray import of one fails the test
instead of being satisfied by the development venv.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.cli.stack import RunningStack
from tests.support.procs import ROOT

# What a laptop with only the SDK must never need.
SERVER_SIDE = (
    "cyberdesk_common",
    "cyberdesk_stack",
    "gateway_svc",
    "instance_svc",
    "billing_svc",
    "guest_agent",
    "redis",
    "opentelemetry",
    "kubernetes",
    "stripe",
    "fastapi",
    "uvicorn",
    "websockets",
    "unkey",
    "grpc_health",
    "grpc_reflection",
)

_BLOCKER = f"""
import sys

BLOCKED = {SERVER_SIDE!r}


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is not part of the SDK distribution", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # setuptools copies into sdk/python/build/lib and never removes what is gone from the source,
    # so a module deleted since the last build would ship in the wheel: start from nothing.
    shutil.rmtree(ROOT / "sdk" / "python" / "build", ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), "sdk/python"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("cyberdesk-*.whl")
    return built


def test_the_wheel_holds_the_sdk_and_the_generated_code_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        headers = email.parser.Parser().parsestr(archive.read(metadata).decode())
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"cyberdesk", "cyberdesk_proto"}
    assert "cyberdesk/_stack.py" not in names and not any(n.startswith("cyberdesk/v1/") for n in names)
    required = sorted(req.split(">")[0].split("=")[0].split(";")[0].strip() for req in headers.get_all("Requires-Dist"))
    assert required == ["googleapis-common-protos", "grpcio", "protobuf"]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "cyberdesk = cyberdesk.cli:main" in archive.read(entry_points).decode()


def test_the_cli_from_the_wheel_alone_runs_a_command(wheel: Path, stack: RunningStack, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    (site / "sitecustomize.py").write_text(_BLOCKER)
    env = {**stack.env, "PYTHONPATH": str(site)}
    env.pop("PYTHONSAFEPATH", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        # Not from the checkout (cwd would put it on sys.path): from the unpacked wheel only.
        return subprocess.run(
            [sys.executable, "-c", "import sys; from cyberdesk.cli import main; sys.exit(main())", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    made = cli("create", "--timeout", "120")
    assert made.returncode == 0, made.stderr
    instance = made.stdout.strip()
    try:
        ran = cli("exec", instance, "--", "echo from-the-sdk-wheel; exit 3")
        assert (ran.returncode, ran.stdout) == (3, "from-the-sdk-wheel\n"), ran.stderr
        where = cli("exec", instance, "--", "true")
        assert where.returncode == 0, where.stderr
        # The blocker is live: the launcher (server side) is refused with a message, not a traceback.
        up = cli("up")
        assert up.returncode == 2 and "server distribution" in up.stderr and "Traceback" not in up.stderr
    finally:
        cli("rm", instance)
    probe = subprocess.run(
        [sys.executable, "-c", "import cyberdesk, cyberdesk_proto; print(cyberdesk.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.startswith(str(site)), "the CLI ran the checkout's code, not the wheel's"
    assert os.path.isdir(site / "cyberdesk_proto" / "v1")
