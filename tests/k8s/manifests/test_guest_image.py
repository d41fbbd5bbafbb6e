"""The guest image recipe (k8s/guest-image/), checked with the real validators Debian has.

No VM is built here (no KVM, no libguestfs, no network): what can be checked is. The systemd units
pass `systemd-analyze verify` against a root tree laid out as the image installs them; the image's
cloud-init settings and the operator's per-VM cloud-config pass `cloud-init schema`; the build
script passes shellcheck; and the launcher the unit runs is run for real: from the files the
operator's cloud-config writes (token, certificate and key made by the operator's own code), it
starts the real guest agent as an unprivileged user on loopback with TLS, and a command run
through that agent can neither read the secret files nor get their content from the agent.
"""

from __future__ import annotations

import base64
import configparser
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from cyberdesk_proto.v1 import process_pb2, process_pb2_grpc
from cyberdesk_stack.processes import free_port, stop
from instance_svc.operator import cloudinit, contract, tls
from kube_emulator.guest import parse_env_file

ROOT = Path(__file__).resolve().parents[3]
GUEST = ROOT / "k8s" / "guest-image"
UNITS = sorted(GUEST.glob("*.service"))
LAUNCHER = GUEST / "agent_launch.py"
LAUNCHER_INSTALLED = "/usr/local/libexec/cyberdesk/agent-launch"
DATA_DISK = GUEST / "data-disk.sh"
DATA_DISK_INSTALLED = "/usr/local/libexec/cyberdesk/data-disk"
AGENT_UNIT = GUEST / contract.AGENT_UNIT


def _tool(name: str, package: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is not installed: run `make setup` (Debian package {package})"
    return found


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def _render(desktop: bool = False, **overrides: Any) -> str:
    material = tls.make(contract.agent_server_name("i-0123456789ab"))
    fields: dict[str, Any] = {
        "token": secrets.token_urlsafe(32),
        "cert_pem": material.cert_pem,
        "key_pem": material.key_pem,
        "port": contract.DEFAULT_AGENT_PORT,
        "instance_id": "i-0123456789ab",
        "disk_mib": 2048,
        "desktop": desktop,
        **overrides,
    }
    return cloudinit.render(**fields)


# --- systemd ----------------------------------------------------------------------------------------


def _exec_binaries(path: Path) -> set[str]:
    unit = _unit(path)
    binaries = set()
    for key in ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecStop"):
        value = unit["Service"].get(key)
        if value:
            binaries.add(value.lstrip("-+!@:").split()[0])
    return binaries


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` of the units in a root laid out as the image is (build.sh).

    The root holds this machine's (Debian 12, as the image) systemd units, the launcher where
    build.sh installs it, and the Debian binaries the units run. verify then checks every key and
    value, the dependencies on other units and that each command is an executable file.
    """
    analyze = _tool("systemd-analyze", "systemd")
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    for binary in set().union(*(_exec_binaries(u) for u in UNITS)):
        target = root / binary.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if binary == LAUNCHER_INSTALLED:
            shutil.copy(LAUNCHER, target)
        elif binary == DATA_DISK_INSTALLED:
            shutil.copy(DATA_DISK, target)
        else:
            assert Path(binary).is_file(), f"{binary} is not a Debian binary here (is its package in build.sh?)"
            shutil.copy(binary, target)
    names = [f"/etc/systemd/system/{u.name}" for u in UNITS]
    proc = subprocess.run(
        [analyze, "verify", f"--root={root}", *names], capture_output=True, text=True, timeout=60, cwd=root
    )
    # verify exits 0 on a mere unknown key: any line it prints is a finding.
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


def test_systemd_analyze_finds_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a missing program are reported."""
    analyze = _tool("systemd-analyze", "systemd")
    broken = tmp_path / "broken.service"
    text = AGENT_UNIT.read_text().replace("NoNewPrivileges=", "NoNewPrivilege=")
    broken.write_text(text.replace(LAUNCHER_INSTALLED, "/nonexistent/agent-launch"))
    proc = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert "Unknown key 'NoNewPrivilege'" in output
    assert "/nonexistent/agent-launch" in output and proc.returncode != 0


def test_the_agent_unit_is_hardened_as_the_readme_says() -> None:
    service = _unit(AGENT_UNIT)["Service"]
    assert service["ExecStart"].split()[:4] == [LAUNCHER_INSTALLED, "--user", "user", "--"]
    assert service["ExecStart"].split()[4:] == ["/opt/cyberdesk/venv/bin/python", "-m", "guest_agent"]
    assert service["EnvironmentFile"] == contract.GUEST_ENV_FILE
    # The launcher drops privileges itself, so no User=; what it needs before that, and nothing more.
    assert "User" not in service
    assert set(service["CapabilityBoundingSet"].split()) == {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN"}
    for key in (
        "NoNewPrivileges",
        "RestrictSUIDSGID",
        "ProtectKernelModules",
        "ProtectKernelTunables",
        "PrivateDevices",
    ):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "full"
    readme = (GUEST / "README.md").read_text()
    for key in service:
        if key[0].isupper() and key not in ("ExecStart", "Type"):
            assert f"`{key}" in readme, f"README.md does not say why {key}"
    # What a tenant needs and the README says why it is left alone.
    for key in ("PrivateTmp", "ProtectHome", "RestrictNamespaces", "MemoryDenyWriteExecute", "User"):
        assert key not in service and f"`{key}" in readme, key
    install = _unit(AGENT_UNIT)["Install"]
    assert install["WantedBy"] == "multi-user.target"
    assert "cloud-init.service" in _unit(AGENT_UNIT)["Unit"]["After"].split()


def test_the_desktop_units_run_as_the_tenant_user() -> None:
    for name in ("cyberdesk-desktop.service", "cyberdesk-wm.service"):
        service = _unit(GUEST / name)["Service"]
        assert service["User"] == "user" and service["NoNewPrivileges"] == "yes", name
        assert service["CapabilityBoundingSet"] == "", name
    xvfb = _unit(GUEST / "cyberdesk-desktop.service")
    assert "cyberdesk-agent.service" in xvfb["Unit"]["Before"].split()
    # The display the operator's cloud-config names for a desktop VM.
    env = parse_env_file(_written(_render(desktop=True))[contract.GUEST_ENV_FILE])
    assert f"{env['DISPLAY']} " in xvfb["Service"]["ExecStart"]


# --- cloud-init ---------------------------------------------------------------------------------------


def _schemas(tmp_path: Path, texts: dict[str, str]) -> dict[str, subprocess.CompletedProcess[str]]:
    """`cloud-init schema --config-file` of each text, the runs side by side (each loads all of cloud-init)."""
    tool = _tool("cloud-init", "cloud-init")
    running = {}
    for name, text in texts.items():
        path = tmp_path / name
        path.write_text(text)
        argv = [tool, "schema", "--config-file", str(path)]
        running[name] = (argv, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = {}
    for name, (argv, proc) in running.items():
        out, err = proc.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    return done


def test_cloud_configs_pass_cloud_init_schema(tmp_path: Path) -> None:
    results = _schemas(
        tmp_path,
        {
            "99-cyberdesk.cfg": (GUEST / "99-cyberdesk.cfg").read_text(),
            # An instance's desktop VM, and a warm-pool member (no instance yet: bound at its claim).
            "desktop-instance": _render(desktop=True, instance_id="i-0123456789ab"),
            "pool-member": _render(desktop=False, instance_id=""),
        },
    )
    for name, proc in results.items():
        assert proc.returncode == 0, f"{name}: {proc.stdout}{proc.stderr}"
        assert "Valid cloud-config" in proc.stdout, name


def test_cloud_init_schema_refuses_a_broken_config(tmp_path: Path) -> None:
    config = yaml.safe_load(_render().removeprefix("#cloud-config\n"))
    config["write_files"][0]["permissions"] = 600  # an int: the schema wants the octal string
    proc = _schemas(tmp_path, {"broken": "#cloud-config\n" + yaml.safe_dump(config)})["broken"]
    assert proc.returncode != 0 and "permissions" in proc.stderr


def _written(rendered: str) -> dict[str, str]:
    """What the cloud-config's write_files write: path -> content."""
    config = yaml.safe_load(rendered)
    out = {}
    for entry in config["write_files"]:
        content = entry["content"]
        if (entry.get("encoding") or "") in ("b64", "base64"):
            content = base64.b64decode(content).decode()
        out[entry["path"]] = content
    return out


def test_the_operators_cloud_config_feeds_the_unit_and_the_launcher() -> None:
    import ast

    from tests.support.procs import ROOT as repo

    rendered = _render()
    config = yaml.safe_load(rendered)
    modes = {e["path"]: (e.get("owner"), e.get("permissions")) for e in config["write_files"]}
    written = _written(rendered)
    env = parse_env_file(written[_unit(AGENT_UNIT)["Service"]["EnvironmentFile"]])
    launcher = ast.parse(LAUNCHER.read_text())
    secret_variables = next(
        ast.literal_eval(n.value)
        for n in ast.walk(launcher)
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "SECRET_FILE_VARIABLES"
    )
    for variable in secret_variables:
        path = env[variable]
        # Root-only in the guest: only the launcher (root) reads them, the agent gets pipes.
        assert modes[path] == ("root:root", "0600"), path
        assert path.startswith(contract.GUEST_CONFIG_DIR + "/agent/")
    # Every file the environment names is one the cloud-config writes; nothing else is secret.
    assert {v for v in env.values() if v.startswith("/etc/")} == {env[v] for v in secret_variables}
    # The agent reads every variable the environment sets (guest_agent's CYBERDESK_AGENT_* names).
    agent_code = "\n".join(p.read_text() for p in (repo / "guest_agent").glob("*.py"))
    for variable in env:
        if variable.startswith("CYBERDESK_AGENT_"):
            short = variable.removeprefix("CYBERDESK_")
            assert f'"{short}"' in agent_code or f'"{variable}"' in agent_code, variable
    assert env["CYBERDESK_AGENT_LISTEN"] == f"0.0.0.0:{contract.DEFAULT_AGENT_PORT}"
    # Whatever it runs through systemctl names the image's unit.
    units = [cmd[-1] for cmd in config.get("runcmd", []) if isinstance(cmd, list) and cmd[0] == "systemctl"]
    assert set(units) <= {contract.AGENT_UNIT} and AGENT_UNIT.is_file()


# --- build script, Containerfile, sysctl ---------------------------------------------------------


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = [GUEST / "build.sh", DATA_DISK]
    proc = subprocess.run(
        [_tool("shellcheck", "shellcheck"), "--severity=style", *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in (*scripts, LAUNCHER):
        assert os.access(path, os.X_OK), path


def test_build_script_installs_what_the_units_run() -> None:
    script = (GUEST / "build.sh").read_text()
    uploads = dict(re.findall(r'--upload "\$here/([^:"]+):([^"]+)"', script))
    assert uploads["agent_launch.py"] == LAUNCHER_INSTALLED
    assert uploads["data-disk.sh"] == DATA_DISK_INSTALLED
    for unit in UNITS:
        assert uploads[unit.name] == f"/etc/systemd/system/{unit.name}", unit.name
        assert f"systemctl enable {unit.name}" in script or f" {unit.name}" in script, unit.name
    for name in uploads:
        assert (GUEST / name).is_file(), name
    assert uploads["99-cyberdesk.cfg"] == "/etc/cloud/cloud.cfg.d/99-cyberdesk.cfg"
    # The desktop units run Debian's Xvfb and matchbox: their packages are in the desktop list.
    assert re.search(r"desktop_packages=\(.*\bxvfb\b.*\bmatchbox-window-manager\b", script)
    # The agent's environment file lives in the directory the image makes root-only.
    assert "--chmod '0700:/etc/cyberdesk/agent'" in script
    # Everything the platform image copies for the two distributions, the guest copies too (its
    # last stage: the one before builds the web console, which the guest does not serve).
    containerfile = re.split(r"^FROM ", (ROOT / "k8s" / "Containerfile").read_text(), flags=re.MULTILINE)[-1]
    # (COPY --from=... takes another stage's output, not the checkout's files.)
    for copied in re.findall(r"^COPY ([^-\s]\S*) ", containerfile, re.MULTILINE):
        if copied != "pyproject.toml":
            assert f" {copied}" in script, copied


def test_containerfile_makes_a_containerdisk() -> None:
    lines = [line for line in (GUEST / "Containerfile").read_text().splitlines() if line and not line.startswith("#")]
    # KubeVirt's containerDisk: only the disk, at /disk/, readable by virt-launcher's qemu (107).
    assert lines == ["FROM scratch", "ADD --chown=107:107 disk.qcow2 /disk/"]
    assert "out/disk.qcow2" in (GUEST / "Containerfile").read_text()


def test_sysctl_settings_are_well_formed() -> None:
    for line in (GUEST / "60-cyberdesk.conf").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)+ = \d+( \d+)*", line), line


# --- the launcher, for real ---------------------------------------------------------------------------


@pytest.fixture
def guest_root() -> Iterator[Path]:
    """A directory every user may traverse (unlike pytest's tmp_path), for the guest's files."""
    path = Path(tempfile.mkdtemp(prefix="cyberdesk-guest-test-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _agent_pythonpath() -> str:
    from instance_svc.runtime.local.agent_code import package_dirs, site_packages

    return ":".join(dict.fromkeys([*(str(p.parent) for p in package_dirs()), str(site_packages())]))


def test_launched_agent_keeps_its_secrets_from_the_tenant(guest_root: Path) -> None:
    assert os.geteuid() == 0, "the launcher starts as root in the VM; this test runs it so (as CI does)"
    user = pwd.getpwnam("nobody")
    vm = "i-0123456789ab"
    material = tls.make(contract.agent_server_name(vm))
    token = secrets.token_urlsafe(32)
    port = free_port()
    rendered = cloudinit.render(
        token=token,
        cert_pem=material.cert_pem,
        key_pem=material.key_pem,
        port=port,
        instance_id=vm,
        disk_mib=2048,
        desktop=False,
    )
    # cloud-init's part: write_files, re-rooted under guest_root, with their owners and modes.
    config = yaml.safe_load(rendered)
    moved: dict[str, str] = {}
    for entry in config["write_files"]:
        path = guest_root / entry["path"].lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        path.write_text(entry["content"])
        path.chmod(int(entry["permissions"], 8))
        assert entry["owner"] == "root:root"
        moved[entry["path"]] = str(path)
    env = parse_env_file(Path(moved[contract.GUEST_ENV_FILE]).read_text())
    env = {k: moved.get(v, v) for k, v in env.items()}
    # systemd's part: the unit's environment; loopback instead of 0.0.0.0 (tests stay on loopback).
    env["CYBERDESK_AGENT_LISTEN"] = f"127.0.0.1:{port}"
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", PYTHONPATH=_agent_pythonpath(), PYTHONNOUSERSITE="1", DISPLAY="")
    log = guest_root / "agent.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [str(LAUNCHER), "--user", user.pw_name, "--", "/usr/bin/python3", "-m", "guest_agent"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd="/",
        )
    credentials = grpc.ssl_channel_credentials(root_certificates=material.ca_pem.encode())
    options = [("grpc.ssl_target_name_override", contract.agent_server_name(vm))]
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
            stub = process_pb2_grpc.ProcessServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)

            def run(*argv: str) -> process_pb2.RunProcessResponse:
                request = process_pb2.RunProcessRequest(instance_id=vm, argv=list(argv))
                reply: process_pb2.RunProcessResponse = stub.RunProcess(request, metadata=metadata, timeout=60)
                return reply

            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, f"the agent exited: {log.read_text(errors='replace')}"
                try:
                    uid = run("id", "-u")
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                    assert time.monotonic() < deadline, f"the agent did not answer: {log.read_text(errors='replace')}"
                    time.sleep(0.1)
            # The agent, and so every command, runs as the user: not root.
            assert uid.stdout.decode().strip() == str(user.pw_uid)
            # It answers only its token.
            with pytest.raises(grpc.RpcError) as refused:
                stub.RunProcess(
                    process_pb2.RunProcessRequest(instance_id=vm, argv=["true"]),
                    metadata=(("authorization", "Bearer " + "x" * 43),),
                    timeout=30,
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # The secret files are root's.
            for variable in ("CYBERDESK_AGENT_TOKEN_FILE", "CYBERDESK_AGENT_TLS_KEY"):
                denied = run("cat", env[variable])
                assert denied.exited.exit_code != 0 and b"Permission denied" in denied.stderr, variable
            # What the agent was handed are pipes it has drained: nothing left for a command to read,
            # through its own copy of the variable or through the agent's descriptors.
            leak = run(
                "sh",
                "-c",
                'cat "$CYBERDESK_AGENT_TOKEN_FILE" "$CYBERDESK_AGENT_TLS_KEY" 2>/dev/null;'
                ' for v in $(tr "\\0" "\\n" </proc/$PPID/environ | grep "^CYBERDESK_AGENT_.*=/proc/self/fd/");'
                ' do cat "/proc/$PPID/fd/${v##*/}" 2>/dev/null; done; cat /proc/$PPID/environ',
            )
            assert token.encode() not in leak.stdout
            assert b"PRIVATE KEY" not in leak.stdout
            assert b"/proc/self/fd/" in leak.stdout  # the agent's environment was read: the check ran
    finally:
        stop(proc)
    assert token not in log.read_text(errors="replace")


def test_launcher_refuses_an_inline_token_and_root(guest_root: Path) -> None:
    base = {"PATH": "/usr/bin:/bin"}
    inline = subprocess.run(
        [str(LAUNCHER), "--user", "nobody", "--", "/bin/true"],
        env={**base, "CYBERDESK_AGENT_TOKEN": "t" * 43},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert inline.returncode == 2 and "CYBERDESK_AGENT_TOKEN_FILE" in inline.stderr
    as_root = subprocess.run(
        [str(LAUNCHER), "--user", "root", "--", "/bin/true"], env=base, capture_output=True, text=True, timeout=30
    )
    assert as_root.returncode == 2 and "must not run as root" in as_root.stderr
    missing = subprocess.run(
        [str(LAUNCHER), "--user", "nobody", "--", "/bin/true"],
        env={**base, "CYBERDESK_AGENT_TOKEN_FILE": str(guest_root / "absent")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr


# --- the data disk, for real ----------------------------------------------------------------------------


def _blkid(device: str, tag: str) -> str:
    proc = subprocess.run(["blkid", "-p", "-o", "value", "-s", tag, device], capture_output=True, text=True, timeout=30)
    return proc.stdout.strip()


def test_data_disk_is_formatted_once_and_mounted_as_the_home(guest_root: Path) -> None:
    """data-disk.sh on loop devices: the root and the seed disk untouched, the blank one formatted once."""
    assert os.geteuid() == 0, "the script runs as root in the VM; this test runs it so (as CI does)"
    losetup = _tool("losetup", "mount")
    images = {}
    for name in ("root", "seed", "data"):
        images[name] = guest_root / f"{name}.img"
        with open(images[name], "wb") as disk:
            disk.truncate(64 << 20)
    # The seed disk stands for cloud-init's (a file system that is not ours).
    subprocess.run(["mkfs.ext4", "-q", "-L", "cidata", str(images["seed"])], check=True, timeout=60)
    attached: list[str] = []
    home = guest_root / "home"
    home.mkdir()
    try:
        for name in ("root", "seed", "data"):
            attached.append(
                subprocess.run(
                    [losetup, "--find", "--show", str(images[name])], capture_output=True, text=True, check=True
                ).stdout.strip()
            )
        root_dev, seed_dev, data_dev = attached
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CYBERDESK_DATA_DEVICES": " ".join(attached),
            "CYBERDESK_DATA_HOME": str(home),
            "CYBERDESK_DATA_USER": "nobody",
            "CYBERDESK_ROOT_DISK": root_dev,
        }

        def run(devices: str | None = None) -> str:
            proc = subprocess.run(
                [str(DATA_DISK)],
                env={**env, **({"CYBERDESK_DATA_DEVICES": devices} if devices is not None else {})},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            return proc.stdout

        def mounted() -> str:
            return subprocess.run(
                ["findmnt", "-no", "SOURCE", str(home)], capture_output=True, text=True
            ).stdout.strip()

        # First boot: the blank disk becomes the home, owned by the user; the others are untouched.
        assert f"{data_dev} formatted and mounted" in run()
        assert mounted() == data_dev and _blkid(data_dev, "LABEL") == "cyberdesk-data"
        assert home.stat().st_uid == pwd.getpwnam("nobody").pw_uid
        assert _blkid(root_dev, "TYPE") == "" and _blkid(seed_dev, "LABEL") == "cidata"
        (home / "work.txt").write_text("kept")
        subprocess.run(["umount", str(home)], check=True, timeout=60)
        # A later boot (or a VM restored from a snapshot of the disk): mounted as it is, not formatted.
        assert f"{data_dev} mounted at" in run()
        assert (home / "work.txt").read_text() == "kept"
        subprocess.run(["umount", str(home)], check=True, timeout=60)
        # A dataVolume template's VM has no data disk: nothing is formatted or mounted.
        assert "no data disk" in run(f"{root_dev} {seed_dev}")
        assert mounted() == "" and _blkid(root_dev, "TYPE") == ""
    finally:
        subprocess.run(["umount", str(home)], capture_output=True, timeout=60)
        for device in attached:
            subprocess.run([losetup, "-d", device], capture_output=True, timeout=60)
