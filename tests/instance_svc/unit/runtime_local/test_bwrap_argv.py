"""The sandbox command line (instance_svc/runtime/local/bwrap.py), built without starting anything."""

from __future__ import annotations

from pathlib import Path

from instance_svc.runtime.local import bwrap


def _launch(**kw: object) -> bwrap.Launch:
    fields: dict[str, object] = {
        "layer": Path("/state/instances/sb-a/layer"),
        "sock_dir": Path("/state/instances/sb-a/sock"),
        "hostname": "i-abc",
        "internet": False,
        "uid": 100_000,
        "gid": 100_000,
        "python_prefix": Path("/opt/py"),
        "python": Path("/opt/py/bin/python3.11"),
        "site_packages": Path("/venv/lib/python3.11/site-packages"),
        "packages": (Path("/src/guest_agent"), Path("/src/cyberdesk_common")),
        "command": ["/opt/py/bin/python3.11", "-m", "guest_agent"],
        "info_fd": 7,
        "cgroup_procs": ("/sys/fs/cgroup/cyberdesk/sb-a/cgroup.procs",),
        **kw,
    }
    return bwrap.Launch(**fields)  # type: ignore[arg-type]


def _pairs(argv: list[str], flag: str) -> list[tuple[str, str]]:
    return [(argv[i + 1], argv[i + 2]) for i, arg in enumerate(argv) if arg == flag]


def test_sources_are_staged_and_bound_from_the_stage() -> None:
    argv = bwrap.argv(_launch())
    assert argv[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    stage, procs, count = argv[9:12]
    assert stage == "/mnt" and procs == "/sys/fs/cgroup/cyberdesk/sb-a/cgroup.procs"
    sources = argv[12 : 12 + int(count)]
    # Layer, socket dir, interpreter prefix, site-packages, then each package: in staging order.
    assert sources == [
        "/state/instances/sb-a/layer",
        "/state/instances/sb-a/sock",
        "/opt/py",
        "/venv/lib/python3.11/site-packages",
        "/src/guest_agent",
        "/src/cyberdesk_common",
    ]
    binds = _pairs(argv, "--bind")
    assert ("/mnt/0/home", "/home") in binds and ("/mnt/1", bwrap.SOCK_DIR) in binds
    assert {target for _, target in binds} == {f"/{d}" for d in bwrap.LAYER_DIRS} | {bwrap.SOCK_DIR}
    ro = _pairs(argv, "--ro-bind")
    assert ("/mnt/4", f"{bwrap.AGENT_DIR}/agent/guest_agent") in ro
    assert ("/mnt/5", f"{bwrap.AGENT_DIR}/agent/cyberdesk_common") in ro
    assert ("/mnt/3", f"{bwrap.AGENT_DIR}/site-packages") in ro
    # The host's state dir is never bound directly: only through the private stage.
    assert not any(src.startswith("/state") for src, _ in binds + ro)


def test_privileges_are_dropped_before_bubblewrap_and_the_command_comes_last() -> None:
    argv = bwrap.argv(_launch())
    setpriv = argv.index("setpriv")
    assert argv[setpriv : setpriv + 5] == ["setpriv", "--reuid=100000", "--regid=100000", "--clear-groups", "--"]
    assert argv[setpriv + 5 : setpriv + 7] == ["bwrap", "--unshare-all"]
    assert argv[argv.index("--info-fd") + 1] == "7"
    assert argv[argv.index("--hostname") + 1] == "i-abc"
    assert argv[-4:] == ["--", "/opt/py/bin/python3.11", "-m", "guest_agent"]


def test_network_is_never_shared_and_rlimit_only_without_a_memory_cgroup() -> None:
    closed = bwrap.argv(_launch())
    assert "--share-net" not in closed and "--block-fd" not in closed and "prlimit" not in closed
    # INTERNET: its own namespace too (network.py attaches slirp4netns), PID 1 blocked until then.
    opened = bwrap.argv(_launch(internet=True, block_fd=9, data_rlimit=64 << 20))
    assert "--share-net" not in opened and "--unshare-all" in opened
    assert opened[opened.index("--block-fd") + 1] == "9"
    prlimit = opened.index("prlimit")
    assert opened[prlimit : prlimit + 3] == ["prlimit", f"--data={64 << 20}", "--"]
    assert prlimit < opened.index("setpriv")


def test_an_interpreter_under_usr_is_not_bound_again() -> None:
    # /usr is bound read-only as a whole already.
    argv = bwrap.argv(_launch(python_prefix=Path("/usr/local"), python=Path("/usr/local/bin/python3.11")))
    count = int(argv[11])
    assert "/usr/local" not in argv[12 : 12 + count] and count == 5


def test_agent_command_with_and_without_a_desktop() -> None:
    python = Path("/opt/py/bin/python3.11")
    assert bwrap.agent_command(python, None, "") == [str(python), "-m", "guest_agent"]
    desktop = bwrap.agent_command(python, (640, 480), "twm")
    assert desktop[:2] == ["/bin/sh", "-c"] and desktop[2] == bwrap.DESKTOP_SCRIPT
    assert desktop[3:] == ["cyberdesk-desktop", "640x480x24", "twm", str(python), "-m", "guest_agent"]
