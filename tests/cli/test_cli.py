"""The CLI driven as a user would, against a stack started with `cyberdesk up`.

Tests run in file order; the last one presses Ctrl-C and checks that nothing is left behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import select
import signal
import stat
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from tests.cli.stack import CLI, RunningStack


def _ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def _one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    return stderr


@pytest.fixture(scope="module")
def box(stack: RunningStack) -> str:
    created = json.loads(_ok(stack.cli("create", "--timeout", "600", "--json")))
    assert created["state"] == "RUNNING"
    return str(created["instance_id"])


def test_up_wrote_a_private_config(stack: RunningStack) -> None:
    assert stat.S_IMODE(stack.config.stat().st_mode) == 0o600
    saved = json.loads(stack.config.read_text())
    assert saved["endpoint"] == stack.gateway
    assert saved["api_key"].startswith("cd_")
    assert saved["http_endpoint"].startswith("http://127.0.0.1:")  # the gateway's REST face
    assert _ok(stack.cli("config", "get", "http_endpoint")).strip() == saved["http_endpoint"]
    assert _ok(stack.cli("config", "get", "endpoint")).strip() == stack.gateway
    assert _ok(stack.cli("config", "get", "api_key")).strip() == saved["api_key"]
    assert "gateway (gRPC)" in stack.output.decode()


def test_create_list_get(stack: RunningStack, box: str) -> None:
    listed = json.loads(_ok(stack.cli("list", "--json")))
    assert box in [i["instance_id"] for i in listed]
    assert box in _ok(stack.cli("list"))
    got = json.loads(_ok(stack.cli("get", box, "--json")))
    assert got["instance_id"] == box and got["state"] == "RUNNING"


def test_exec_streams_and_exits_with_the_remote_code(stack: RunningStack, box: str) -> None:
    result = stack.cli("exec", box, "--", "echo to-out; echo to-err >&2; exit 3")
    assert result.returncode == 3
    assert result.stdout == b"to-out\n"
    assert result.stderr == b"to-err\n"
    argv = stack.cli("exec", box, "--", "printf", "%s|", "a b", "c")
    assert (argv.returncode, argv.stdout) == (0, b"a b|c|")
    assert stack.cli("exec", box, "--", "no-such-command-xyz").returncode == 127
    piped = stack.cli("exec", "-i", box, "--", "tr", "a-z", "A-Z", input=b"hello\n")
    assert piped.stdout == b"HELLO\n"


def test_exec_timeout_kills_and_exits_124(stack: RunningStack, box: str) -> None:
    result = stack.cli("exec", box, "--timeout", "1", "--", "sleep 30; echo never")
    assert result.returncode == 124
    assert b"never" not in result.stdout
    assert "timeout" in _one_line_error(result)


def test_ctrl_c_during_exec_kills_the_remote_command(stack: RunningStack, box: str) -> None:
    proc = subprocess.Popen(
        [CLI, "exec", box, "--", "echo started; exec sleep 97"],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and b"Traceback" not in err
    deadline = time.monotonic() + 15
    while b"sleep 97" in stack.cli("exec", box, "--", "ps -eo args").stdout:
        assert time.monotonic() < deadline, "the remote command outlived the local Ctrl-C"
        time.sleep(0.2)


def test_cp_both_ways_with_checksum(stack: RunningStack, box: str, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    _ok(stack.cli("cp", str(local), f"{box}:/tmp/up/"))
    remote_sum = _ok(stack.cli("exec", box, "--", "sha256sum /tmp/up/blob.bin")).split()[0]
    assert remote_sum == hashlib.sha256(data).hexdigest()
    back = tmp_path / "back.bin"
    _ok(stack.cli("cp", f"{box}:/tmp/up/blob.bin", str(back)))
    assert hashlib.sha256(back.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    missing = stack.cli("cp", f"{box}:/tmp/nope.bin", str(tmp_path / "nope.bin"))
    assert "NOT_FOUND" in _one_line_error(missing)
    assert not list(tmp_path.glob("*nope*"))  # no partial file left behind


def test_cp_shows_a_progress_bar_on_a_terminal(stack: RunningStack, box: str, tmp_path: Path) -> None:
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(8 * 1024 * 1024))
    pid, fd = pty.fork()
    if pid == 0:  # stderr is a terminal here, as for a person at a shell
        os.execve(CLI, [CLI, "cp", str(local), f"{box}:/tmp/big.bin"], stack.env)
    seen = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen.extend(chunk)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, bytes(seen)
    assert b"100%" in seen and b"8.0 MiB/8.0 MiB" in seen
    piped = stack.cli("cp", str(local), f"{box}:/tmp/big2.bin")
    assert b"%" not in piped.stderr  # no bar when stderr is not a terminal


def test_ls(stack: RunningStack, box: str) -> None:
    _ok(stack.cli("exec", box, "--", "mkdir -p /tmp/ls/sub && printf abc > /tmp/ls/f.txt"))
    assert _ok(stack.cli("ls", f"{box}:/tmp/ls")).split() == ["f.txt", "sub/"]
    entries = {e["name"]: e for e in json.loads(_ok(stack.cli("ls", f"{box}:/tmp/ls", "--json")))}
    assert entries["f.txt"]["size"] == 3 and entries["sub"]["type"] == "directory"
    long = _ok(stack.cli("ls", "-l", f"{box}:/tmp/ls/f.txt"))
    assert long.startswith("-rw") and "f.txt" in long
    assert "NOT_FOUND" in _one_line_error(stack.cli("ls", f"{box}:/tmp/absent"))


def test_timeout_moves_the_deadline(stack: RunningStack, box: str) -> None:
    before = json.loads(_ok(stack.cli("get", box, "--json")))["expire_time"]
    _ok(stack.cli("timeout", box, "900"))
    after = json.loads(_ok(stack.cli("get", box, "--json")))["expire_time"]
    assert after > before


def test_port_prints_the_preview_url(stack: RunningStack, box: str) -> None:
    import httpx

    serve = "mkdir -p /tmp/p && echo served > /tmp/p/f.txt && cd /tmp/p && "
    serve += "setsid -f python3 -m http.server 3000 --bind 127.0.0.1 >/dev/null 2>&1"
    _ok(stack.cli("exec", box, "--", serve))
    wait = "for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/3000) && exit; sleep 0.1; done; exit 1"
    _ok(stack.cli("exec", box, "--", wait))
    url = _ok(stack.cli("port", box, "3000")).strip()
    assert url.startswith(f"http://3000-{box}.localhost:") and url.endswith("/")
    signed = _ok(stack.cli("port", box, "3000", "--signed", "--path")).strip()
    assert f"/v1/instances/{box}/ports/3000/?cyberdesk_preview_token=" in signed
    got = httpx.get(signed.replace("/?", "/f.txt?"), timeout=30)
    assert got.status_code == 200 and got.text == "served\n"
    info = json.loads(_ok(stack.cli("port", box, "3000", "--json")))
    assert info["url"] == url and info["token"] and not info["public"]
    assert "port must be 1 to 65535" in _one_line_error(stack.cli("port", box, "0"))


def test_snapshot_create_list_rm(stack: RunningStack, box: str) -> None:
    _ok(stack.cli("exec", box, "--", "echo kept > /home/user/kept.txt"))
    snap = json.loads(_ok(stack.cli("snapshot", "create", box, "--name", "t1", "--json")))
    listed = json.loads(_ok(stack.cli("snapshot", "list", box, "--json")))
    assert snap["snapshot_id"] in [s["snapshot_id"] for s in listed]
    restored = _ok(stack.cli("create", "--snapshot", snap["snapshot_id"])).strip()
    assert _ok(stack.cli("exec", restored, "--", "cat /home/user/kept.txt")) == "kept\n"
    _ok(stack.cli("rm", restored))
    _ok(stack.cli("snapshot", "rm", snap["snapshot_id"]))
    listed = json.loads(_ok(stack.cli("snapshot", "list", "--json")))
    assert snap["snapshot_id"] not in [s["snapshot_id"] for s in listed]


def test_create_with_a_disk_size(stack: RunningStack) -> None:
    created = json.loads(_ok(stack.cli("create", "--disk", "512", "--json")))
    try:
        assert created["disk_mib"] == 512
        size = int(_ok(stack.cli("exec", created["instance_id"], "--", "df -B1M --output=size /home | tail -1")))
        assert 480 <= size <= 512  # ext4 keeps a few MiB for itself
    finally:
        _ok(stack.cli("rm", created["instance_id"]))


def test_create_with_an_egress_policy(stack: RunningStack) -> None:
    flags = ["--internet", "--allow", "198.51.100.7", "--allow", "pypi.org", "--deny", "203.0.113.0/24"]
    created = json.loads(_ok(stack.cli("create", *flags, "--json")))
    try:
        expected = {"allow": ["198.51.100.7", "pypi.org"], "deny": ["203.0.113.0/24"]}
        assert created["internet"] is True and created["egress"] == expected
        assert json.loads(_ok(stack.cli("get", created["instance_id"], "--json")))["egress"] == expected
    finally:
        _ok(stack.cli("rm", created["instance_id"]))
    without = stack.cli("create", "--allow", "198.51.100.7")
    assert without.returncode == 2 and "internet" in _one_line_error(without)
    bad = stack.cli("create", "--internet", "--deny", "not a host")
    assert "egress.deny: 'not a host'" in _one_line_error(bad)


def test_exec_says_when_the_kernel_killed_it_for_memory(stack: RunningStack) -> None:
    small = _ok(stack.cli("create", "--memory", "256")).strip()
    try:
        bomb = stack.cli("exec", small, "--", "python3", "-c", "b = bytearray(2**31)")
        assert bomb.returncode == 128 + signal.SIGKILL  # as for any death by SIGKILL
        assert "out of memory" in _one_line_error(bomb) and "256 MiB" in bomb.stderr.decode()
        assert _ok(stack.cli("exec", small, "--", "echo alive")) == "alive\n"
    finally:
        _ok(stack.cli("rm", small))


@pytest.mark.desktop
def test_screenshot(stack: RunningStack, tmp_path: Path) -> None:
    desk = _ok(stack.cli("create", "--desktop", "--width", "640", "--height", "480")).strip()
    try:
        out = tmp_path / "screen.png"
        _ok(stack.cli("screenshot", desk, "-o", str(out)))
        from PIL import Image

        with Image.open(out) as image:
            assert image.format == "PNG" and image.size == (640, 480)
    finally:
        _ok(stack.cli("rm", desk))


def test_screenshot_without_desktop_is_one_clear_line(stack: RunningStack, box: str, tmp_path: Path) -> None:
    result = stack.cli("screenshot", box, "-o", str(tmp_path / "x.png"))
    assert "FAILED_PRECONDITION" in _one_line_error(result)


def test_shell_under_a_pseudo_terminal(stack: RunningStack, box: str) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: `cyberdesk shell` on a real terminal
        os.execve(CLI, [CLI, "shell", box], stack.env)
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        buffer = bytearray()

        def read_until(token: bytes, limit: float = 30) -> None:
            deadline = time.monotonic() + limit
            while token not in buffer:
                assert time.monotonic() < deadline, f"no {token!r} in {bytes(buffer[-400:])!r}"
                ready, _, _ = select.select([fd], [], [], 0.2)
                if ready:
                    buffer.extend(os.read(fd, 65536))

        read_until(b"$ ")  # the prompt: typed-ahead input may be flushed by the shell's start-up
        os.write(fd, b"echo $((6*7))x\r")
        read_until(b"42x")
        os.write(fd, b"stty size\r")
        read_until(b"30 100")
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.kill(pid, signal.SIGWINCH)
        deadline = time.monotonic() + 30
        while b"40 120" not in buffer:  # the resize travels asynchronously: ask until it has arrived
            assert time.monotonic() < deadline, bytes(buffer[-400:])
            os.write(fd, b"stty size\r")
            time.sleep(0.3)
            while select.select([fd], [], [], 0.1)[0]:
                buffer.extend(os.read(fd, 65536))
        # Ctrl-C only once the job says it runs (sent earlier it reaches bash, and the sleep then
        # holds the terminal for 60 s); the needle is computed, so the typed line's echo never matches.
        os.write(fd, b"sh -c 'echo sleeping-$((40+2)); exec sleep 60'\r")
        read_until(b"sleeping-42")
        os.write(fd, b"\x03")  # Ctrl-C reaches the remote foreground job, not the local CLI
        os.write(fd, b"echo after-$((1+1))\r")
        read_until(b"after-2\r\n")
        os.write(fd, b"exit 5\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 5
        # The terminal is back in cooked mode (attributes of the pty pair are shared with the master).
        lflag = termios.tcgetattr(fd)[3]
        assert lflag & termios.ICANON and lflag & termios.ECHO
    finally:
        os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_keys(stack: RunningStack) -> None:
    made = json.loads(_ok(stack.cli("keys", "create", "--name", "ci", "--json")))
    assert made["secret"].startswith("cd_") and made["tenant_id"] == "dev"
    listed = json.loads(_ok(stack.cli("keys", "list", "--json")))
    assert made["key_id"] in [k["key_id"] for k in listed]
    as_new = stack.cli("--api-key", made["secret"], "list", "--json")
    assert as_new.returncode == 0
    _ok(stack.cli("keys", "revoke", made["key_id"]))
    deadline = time.monotonic() + 30
    while True:  # gateways may cache a verification for a few seconds (CYBERDESK_AUTH_CACHE_SECONDS)
        refused = stack.cli("--api-key", made["secret"], "list")
        if refused.returncode != 0:
            assert "UNAUTHENTICATED" in _one_line_error(refused)
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_errors_are_one_line(stack: RunningStack, tmp_path: Path) -> None:
    assert "NOT_FOUND" in _one_line_error(stack.cli("get", "i-000000000000"))
    assert "UNAUTHENTICATED" in _one_line_error(stack.cli("--api-key", "cd_wrong", "list"))
    assert "no API key" in _one_line_error(_without_key(stack))
    assert _one_line_error(stack.cli("cp", str(tmp_path / "absent"), "i-1:/tmp/x"))
    assert _one_line_error(stack.cli("config", "get", "colour"))
    down = stack.cli("--endpoint", "127.0.0.1:1", "list")
    assert "cyberdesk up" in _one_line_error(down)


def _without_key(stack: RunningStack) -> subprocess.CompletedProcess[bytes]:
    env = {**stack.env, "CYBERDESK_CONFIG": str(Path(stack.config).with_name("absent.json"))}
    return subprocess.run([CLI, "list"], env=env, capture_output=True, timeout=60)


def test_rm(stack: RunningStack) -> None:
    doomed = _ok(stack.cli("create")).strip()
    assert _ok(stack.cli("rm", doomed)).strip() == doomed
    assert json.loads(_ok(stack.cli("get", doomed, "--json")))["state"] == "TERMINATED"
    assert doomed not in _ok(stack.cli("list"))
    assert _one_line_error(stack.cli("exec", doomed, "--", "true"))


def test_second_up_on_the_same_state_dir_refuses(stack: RunningStack, box: str) -> None:
    """A second `up` would share the first one's sandboxes and destroy them on exit: it must refuse."""
    second = stack.cli("up", "--state-dir", str(stack.state_dir), "--no-config", timeout=60)
    assert "another `cyberdesk up`" in _one_line_error(second)
    assert _ok(stack.cli("exec", box, "--", "echo still-here")) == "still-here\n"


def test_ctrl_c_stops_everything(stack: RunningStack) -> None:
    """Last: Ctrl-C deletes the instances, stops every process and leaves no sandbox behind."""
    _ok(stack.cli("create"))
    assert stack.stop() == 0
    assert b"stopped" in stack.output
    deadline = time.monotonic() + 10
    while stack.leftovers():
        assert time.monotonic() < deadline, stack.leftovers()
        time.sleep(0.2)
    instances = stack.state_dir / "instances"
    running = [p for p in instances.iterdir() if (p / "state.json").exists()] if instances.exists() else []
    assert running == []
