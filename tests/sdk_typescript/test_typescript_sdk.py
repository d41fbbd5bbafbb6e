"""The TypeScript SDK (sdk/typescript) against a real stack: `node --test` over its compiled tests.

The stack is `cyberdesk up` on free ports (tests/cli/stack.py), as for the Python SDK's tests;
the TypeScript tests get its HTTP endpoint and keys through the environment: the development
key (an admin key: `client.keys`), another tenant's key (NotFound across tenants, PermissionDenied
on keys) and a key allowed one request a minute (RateLimited). A failure shows node's own report.

test/browser.test.ts runs the built SDK in headless Debian chromium (`make system` installs it)
from a page on another loopback port: the gateway allows that origin (CYBERDESK_CORS_ORIGINS),
and not a second page port, whose refusal by the browser is tested too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.stack import RunningStack, running_stack
from tests.support.procs import ROOT, free_port

SDK = ROOT / "sdk" / "typescript"
TSC = SDK / "node_modules" / ".bin" / "tsc"
# About 60 s on an idle 2-core machine; twice that and more on a loaded one.
NODE_TIMEOUT = 360
pytestmark = [pytest.mark.timeout(NODE_TIMEOUT + 120), pytest.mark.sandbox, pytest.mark.desktop]


def _start_build() -> subprocess.Popen[str]:
    """Compile src, tests, examples and bench to dist/ (where the examples' import of the package resolves).

    Started before the stack and waited for after it is up: the two take about as long.
    """
    if shutil.which("node") is None or not TSC.exists():
        pytest.fail("node and sdk/typescript/node_modules are needed: run `make setup`")
    shutil.rmtree(SDK / "dist", ignore_errors=True)  # no compiled test of a deleted source runs
    return subprocess.Popen(
        [str(TSC), "-p", "tsconfig.json"], cwd=SDK, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_build(build: subprocess.Popen[str]) -> None:
    output, _ = build.communicate(timeout=180)
    assert build.returncode == 0, f"tsc:\n{output}"


def _new_key(stack: RunningStack, tenant: str, rate_limit: str | None = None) -> str:
    """A key made with `python -m gateway_svc keys create` on the stack's state directory."""
    args = ["create", "--tenant", tenant, "--name", "ts-sdk-test"]
    if rate_limit:
        args += ["--rate-limit", rate_limit]
    out = subprocess.run(
        [sys.executable, "-m", "gateway_svc", "keys", *args],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "CYBERDESK_STATE_DIR": str(stack.state_dir)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return next(line.split()[1] for line in out.splitlines() if line.startswith("secret"))


def test_typescript_sdk(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is needed for test/browser.test.ts: run `make system` as root")
    build = _start_build()
    page_port, other_page_port = free_port(), free_port()
    cors = {"CYBERDESK_CORS_ORIGINS": f"http://127.0.0.1:{page_port}"}
    try:
        with running_stack(tmp_path, cors) as stack:
            _wait_build(build)
            tests = sorted(str(p.relative_to(SDK)) for p in (SDK / "dist" / "test").glob("*.test.js"))
            assert len(tests) >= 4, tests
            config = stack.env_config()
            env = {
                "PATH": os.environ["PATH"],
                "HOME": str(tmp_path),
                "CYBERDESK_HTTP_ENDPOINT": config["http_endpoint"],
                "CYBERDESK_API_KEY": config["api_key"],
                "CYBERDESK_TEST_CONFIG": str(stack.config),
                "CYBERDESK_TEST_OTHER_KEY": _new_key(stack, "other-ts"),
                "CYBERDESK_TEST_LIMITED_KEY": _new_key(stack, "dev", rate_limit="1/60s"),
                "CYBERDESK_TEST_CHROMIUM": chromium,
                "CYBERDESK_TEST_PAGE_PORT": str(page_port),
                "CYBERDESK_TEST_OTHER_PAGE_PORT": str(other_page_port),
            }
            # node's report goes to a file, so that a run cut off by the timeout still shows how far it got.
            report = tmp_path / "node-test.log"
            with report.open("w") as out:
                # A hung test fails by its own name (--test-timeout) before the whole run is cut off.
                # Three files at a time: most of a test's time is spent waiting on the stack.
                argv = [
                    "node",
                    "--test",
                    "--test-reporter=spec",
                    "--test-timeout=120000",
                    "--test-concurrency=3",
                    *tests,
                ]
                node = subprocess.Popen(argv, cwd=SDK, env=env, stdout=out, stderr=out, start_new_session=True)
                try:
                    code = node.wait(timeout=NODE_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.killpg(node.pid, signal.SIGKILL)  # the runner and its per-file children
                    node.wait()
                    pytest.fail(f"node --test did not finish in {NODE_TIMEOUT} s:\n{report.read_text()}")
    finally:
        if build.poll() is None:
            build.kill()
    output = report.read_text()
    assert code == 0, f"node --test failed:\n{output}"
    # node's summary: as many passed as there are tests, so a file that loaded no test is noticed.
    counts = dict(re.findall(r"^\S*\s*(tests|pass|fail) (\d+)$", output, re.MULTILINE))
    assert counts.get("fail") == "0" and counts.get("pass") == counts.get("tests"), counts
    assert int(counts["pass"]) >= 30, counts
