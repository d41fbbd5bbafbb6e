"""The CLI's argument handling, without a stack: what runs where, and one-line usage errors."""

from __future__ import annotations

import subprocess

import pytest

from cyberdesk.cli._main import UsageError, _pairs, _split_remote, build_parser, parse
from tests.cli.stack import CLI


def test_remote_paths() -> None:
    assert _split_remote("i-abc:/tmp/x") == ("i-abc", "/tmp/x")
    assert _split_remote("./local:file") is None
    assert _split_remote("/abs/path") is None
    assert _split_remote("plain.txt") is None
    with pytest.raises(UsageError, match="absolute"):
        _split_remote("i-abc:relative")


def test_pairs() -> None:
    assert _pairs(["A=1", "B=x=y"], "--env") == {"A": "1", "B": "x=y"}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        _pairs(["nope"], "--env")


def test_exec_options_before_the_double_dash() -> None:
    args = parse(build_parser(), ["exec", "i-1", "--timeout", "5", "--", "ls", "-la", "--timeout"])
    assert (args.id, args.timeout, args.cmd) == ("i-1", 5.0, ["ls", "-la", "--timeout"])
    plain = parse(build_parser(), ["exec", "i-1", "uname"])
    assert plain.cmd == ["uname"] and plain.timeout is None
    shell = parse(build_parser(), ["shell", "i-1", "--", "python3", "-q"])
    assert shell.cmd == ["python3", "-q"]


def test_create_network_and_disk_options() -> None:
    tokens = ["create", "--disk", "512", "--internet", "--allow", "a.test", "--allow", "10.1.0.0/16"]
    args = parse(build_parser(), tokens)
    assert (args.disk, args.internet, args.allow, args.deny) == (512, True, ["a.test", "10.1.0.0/16"], None)
    plain = parse(build_parser(), ["create"])
    assert (plain.disk, plain.internet, plain.allow, plain.deny) == (None, False, None, None)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["cp", "a", "b"], "one of SRC and DST must be ID:/PATH"),
        (["exec", "i-1", "--"], "no command"),
        (["config", "get", "colour"], "unknown setting"),
        (["config", "set", "endpoint", "h:0"], "not host:port"),
        (["create", "--allow", "198.51.100.7"], "allow needs internet=True"),  # refused before any call
    ],
)
def test_usage_errors_are_one_line(argv: list[str], needle: str, tmp_path: object) -> None:
    env = {"CYBERDESK_CONFIG": f"{tmp_path}/c.json", "CYBERDESK_API_KEY": "cd_x", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([CLI, *argv], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_config_set_then_get(tmp_path: object) -> None:
    env = {"CYBERDESK_CONFIG": f"{tmp_path}/c.json", "PATH": "/usr/bin:/bin"}
    assert subprocess.run([CLI, "config", "set", "api_key", "cd_abc"], env=env, timeout=30).returncode == 0
    got = subprocess.run([CLI, "config", "get", "api_key"], env=env, capture_output=True, text=True, timeout=30)
    assert got.stdout == "cd_abc\n"
    missing = subprocess.run([CLI, "config", "get", "http_endpoint"], env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "not set" in missing.stderr
