"""The README's CLI and SDK examples run as written against a stack started by `cyberdesk up`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.stack import RunningStack
from tests.support.procs import ROOT


def _blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using it", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)


def _env(stack: RunningStack) -> dict[str, str]:
    return {**stack.env, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_example(stack: RunningStack, index: int, tmp_path: Path) -> None:
    code = _blocks("python")[index]
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env(stack), cwd=tmp_path, capture_output=True, text=True, timeout=110
    )
    assert done.returncode == 0, done.stderr
    if index == 0:
        assert done.stdout.startswith("3 hello\n oops\n")
        assert "got b'1" in done.stdout and "exit code 0" in done.stdout
        assert "done\n" in done.stdout and "hi there" in done.stdout and "42" in done.stdout
        assert "StatusCode.NOT_FOUND" in done.stdout
        assert "True 9 out of memory: it was killed by the kernel" in done.stdout
        assert "4096 ['pypi.org', '*.pythonhosted.org']" in done.stdout
    else:
        assert "(100, 200)" in done.stdout and "Linux" in done.stdout


def test_shell_example(stack: RunningStack, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("my notes\n")
    (script,) = _blocks("sh")[:1]
    done = subprocess.run(
        ["bash", "-c", script], env=_env(stack), cwd=tmp_path, capture_output=True, text=True, timeout=110,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "copy.txt").read_text() == "my notes\n"
    assert "hello" in done.stdout and "notes.txt" in done.stdout
    # The only complaint is the one the example provokes on purpose (the 5 s timeout).
    assert done.stderr.strip().splitlines() == ["cyberdesk: command killed after its timeout of 5.0 s"], done.stderr
