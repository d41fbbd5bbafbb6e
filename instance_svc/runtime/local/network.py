"""Egress of an INTERNET sandbox: its own network namespace, slirp4netns, and an nft ruleset.

Every sandbox has its own network namespace (bubblewrap `--unshare-all`). A sandbox without
network keeps only its loopback. An INTERNET sandbox additionally gets user-mode networking:

1. bubblewrap starts with `--block-fd`, so the sandbox's PID 1 waits before it execs the agent;
2. once PID 1 sits in read() on that fd (bubblewrap's own setup of the namespace is done), the
   root side (this module, in instance_svc) loads the nft ruleset of `ruleset()` into the
   sandbox's namespace (`nsenter --net`): the tenant holds no CAP_NET_ADMIN there and cannot
   change it;
3. slirp4netns is attached to the namespace (`--netns-type=path /proc/<pid>/ns/net`: the `pid`
   form also joins the sandbox's user namespace, where setns into the netns is refused). It makes
   `tap0` (10.0.2.100, gateway 10.0.2.2, DNS 10.0.2.3) and turns the sandbox's packets into
   ordinary sockets of its own on the host; `--disable-host-loopback` refuses 10.0.2.2 -> host
   127.0.0.1, `--enable-sandbox`/`--enable-seccomp` shrink what a compromised slirp could do;
   no API socket, so no port can ever be forwarded into the sandbox;
4. with host names in the policy, dns_guard.py starts in the namespace;
5. only then the block is released and the agent runs.

Because slirp's sockets are the host's, everything the sandbox must not reach is refused inside
the sandbox's namespace before slirp sees the packet: the slirp network itself (but DNS, port
53 of 10.0.2.3), the host's own addresses (read at create time), loopback, link-local (cloud
metadata), multicast and reserved ranges, the private ranges (other instances, the host's LAN)
unless the operator lifts a range, then the tenant's deny list, then its allow list. When the
lists name hosts, the sandbox's DNS goes through dns_guard.py, which teaches the rules the
addresses of allowed names as it answers and refuses denied ones.

slirp4netns lives as long as the sandbox without anyone watching: its `--exit-fd` is a pidfd of
the sandbox's PID 1, which becomes readable when the sandbox ends, so slirp exits with it even
after instance_svc died. Its pid and start time are in `<dir>/network.json`, so a
delete (also after a restart, and the stack's sweep, which deletes through the runtime) kills it
at once. The DNS guard is recorded and ends the same way. Both join the sandbox's cgroups, so what
tenant traffic costs them counts against the instance and pausing the instance pauses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from instance_svc.runtime.base import RuntimeError_
from instance_svc.runtime.local import procscan

SLIRP_NET = "10.0.2.0/24"
SLIRP_DNS = "10.0.2.3"
# dns_guard.py: where it listens inside the sandbox, and the socket mark only it can set.
GUARD_LISTEN = "127.0.0.53"
GUARD_MARK = 0x43440001
TAP = "tap0"
NETWORK_FILE = "network.json"
TABLE = "cyberdesk_egress"
# The MTU slirp4netns recommends for throughput (its maximum is 65521).
_MTU = 65520

# Never reachable, whatever the operator or the tenant says: "this network", loopback,
# link-local (169.254.169.254 is cloud metadata), multicast, reserved and broadcast.
ALWAYS_DENIED_V4 = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
ALWAYS_DENIED_V6 = ("::/128", "::1/128", "::ffff:0:0/96", "fe80::/10", "ff00::/8")
# Private ranges (other instances, the host's LAN, carrier-grade NAT): denied unless the operator
# allows a range with CYBERDESK_EGRESS_ALLOW_RANGES.
PRIVATE_V4 = ("10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16")
PRIVATE_V6 = ("fc00::/7",)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str], list[str]]

# The whole environment of slirp4netns and the DNS guard: never instance_svc's own, which holds
# the platform's secrets (the guard runs as the sandbox uid).
_HELPER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# dns_guard.py runs from its text (`python3 -c`): the sandbox uid may not reach this checkout.
_GUARD_SOURCE = (Path(__file__).parent / "dns_guard.py").read_text()
# The number of read(2), to see in /proc/<pid>/syscall that PID 1 waits on its block fd.
_READ_SYSCALL = {"x86_64": 0, "aarch64": 63, "riscv64": 63}
# slirp4netns processes this instance_svc started, by pid: kept so that they are reaped (a slirp
# that exited with its sandbox is a zombie until its sandbox is deleted, never longer).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Destinations:
    """A set of networks, split by family (nft matches `ip daddr` and `ip6 daddr` separately)."""

    v4: tuple[ipaddress.IPv4Network, ...] = ()
    v6: tuple[ipaddress.IPv6Network, ...] = ()

    @staticmethod
    def of(networks: Iterable[Network]) -> Destinations:
        """Collapsed per family: nft refuses overlapping elements in one interval set."""
        nets = list(networks)
        v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
        v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
        return Destinations(tuple(ipaddress.collapse_addresses(v4)), tuple(ipaddress.collapse_addresses(v6)))

    def __bool__(self) -> bool:
        return bool(self.v4 or self.v6)


@dataclass(frozen=True)
class Policy:
    """What `ruleset` needs: the tenant's lists resolved, the operator's ranges, the host's addresses."""

    allow: Destinations | None  # None: every public address
    deny: Destinations
    operator_ranges: Destinations
    host: Destinations
    # Host names and wildcards of the lists: when there are any, the sandbox resolves through
    # dns_guard.py, which adds the addresses of allowed names to the rules as it answers.
    allow_names: tuple[str, ...] = ()
    deny_names: tuple[str, ...] = ()
    dns_upstream: str = SLIRP_DNS

    @property
    def guarded(self) -> bool:
        """Whether the sandbox's DNS goes through dns_guard.py."""
        return bool(self.allow_names or self.deny_names)


def parse_ranges(text: str) -> tuple[Network, ...]:
    """CYBERDESK_EGRESS_ALLOW_RANGES: comma-separated CIDRs; ValueError naming the bad one."""
    found: list[Network] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        try:
            found.append(ipaddress.ip_network(entry, strict=True))
        except ValueError as err:
            raise ValueError(f"{entry!r} is not a CIDR ({err})") from None
    return tuple(found)


def system_resolver(name: str) -> list[str]:
    """The addresses `name` resolves to on the host (IPv4 and IPv6)."""
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def resolve(entries: Sequence[str], resolver: Resolver) -> Destinations:
    """The addresses and CIDRs of `entries` as networks, and the addresses host names resolve to now.

    Names are best effort here: a name that does not resolve (yet) adds nothing, and a wildcard
    has no addresses at all. Names are enforced by dns_guard.py, which answers the sandbox's DNS:
    it refuses denied names and adds the addresses of allowed ones as the sandbox asks for them.
    Resolving deny names now as well refuses their current addresses to a client that skips DNS.
    """
    nets: list[Network] = []
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        if entry.startswith("*."):
            continue
        with contextlib.suppress(OSError):
            nets += [ipaddress.ip_network(a) for a in resolver(entry)]
    return Destinations.of(nets)


def host_addresses() -> Destinations:
    """Every address of the host's interfaces now (slirp connects from the host, so each is a way in)."""
    out = subprocess.run(["ip", "-j", "address", "show"], capture_output=True, text=True, timeout=10, check=True)
    nets: list[Network] = []
    for link in json.loads(out.stdout):
        for info in link.get("addr_info", []):
            local = info.get("local")
            if local:
                nets.append(ipaddress.ip_network(local.split("%")[0]))
    return Destinations.of(nets)


def build_policy(
    allow: Sequence[str],
    deny: Sequence[str],
    operator_ranges: Sequence[str],
    resolver: Resolver = system_resolver,
    dns_upstream: str = SLIRP_DNS,
) -> Policy:
    """The policy of one sandbox (blocking: deny names are looked up now, see `resolve`).

    Allow names are not resolved here: an address the name has now might belong to someone else
    by the time the sandbox connects, so only what dns_guard.py answers the sandbox is allowed.
    """
    missing = [tool for tool in ("slirp4netns", "nft", "nsenter", "ip") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError_(f"INTERNET instances need {', '.join(missing)} on the host (make setup installs them)")
    return Policy(
        allow=resolve([e for e in allow if not is_name(e)], resolver) if allow else None,
        deny=resolve(deny, resolver),
        operator_ranges=Destinations.of(ipaddress.ip_network(r, strict=False) for r in operator_ranges),
        host=host_addresses(),
        allow_names=tuple(e for e in allow if is_name(e)),
        deny_names=tuple(e for e in deny if is_name(e)),
        dns_upstream=dns_upstream,
    )


def is_name(entry: str) -> bool:
    """Whether a (validated) egress entry is a host name or wildcard rather than an address or CIDR."""
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return True
    return False


def resolver_address(allow: Sequence[str], deny: Sequence[str]) -> str:
    """The nameserver of the sandbox's resolv.conf: dns_guard.py when the lists name hosts, else slirp's."""
    return GUARD_LISTEN if any(is_name(e) for e in (*allow, *deny)) else SLIRP_DNS


def _set(nets: Iterable[Network]) -> str:
    return "{ " + ", ".join(str(n) for n in nets) + " }"


def _match(dest: Destinations, verdict: str) -> list[str]:
    """`ip daddr {..} verdict` and `ip6 daddr {..} verdict` lines (none for an empty family: nft rejects `{ }`)."""
    lines = []
    if dest.v4:
        lines.append(f"ip daddr {_set(dest.v4)} {verdict}")
    if dest.v6:
        lines.append(f"ip6 daddr {_set(dest.v6)} {verdict}")
    return lines


def ruleset(policy: Policy) -> str:
    """The nft ruleset loaded into an INTERNET sandbox's network namespace (pure).

    First match wins, in this order (docs/network.md explains each):
    loopback of the sandbox itself, DNS to slirp's resolver, then refused: slirp's network, the
    host's addresses, the always-denied ranges, the tenant's deny list; then the operator's
    ranges skip the private-range refusal; private ranges refused; finally the tenant's allow
    list (when it has one: everything else refused) or every other (public) address.
    """
    always = Destinations.of(
        [ipaddress.ip_network(SLIRP_NET)] + [ipaddress.ip_network(n) for n in ALWAYS_DENIED_V4 + ALWAYS_DENIED_V6]
    )
    private = Destinations.of(ipaddress.ip_network(n) for n in PRIVATE_V4 + PRIVATE_V6)
    if policy.guarded:
        # Only dns_guard.py's marked sockets reach the resolver: the tenant cannot skip the guard.
        # Connections are kept once accepted, so a learned address that times out ends no transfer.
        dns = [
            "ct state established,related accept",
            f"ip daddr {policy.dns_upstream} meta mark {GUARD_MARK:#x} udp dport 53 accept",
            f"ip daddr {policy.dns_upstream} meta mark {GUARD_MARK:#x} tcp dport 53 accept",
        ]
    else:
        dns = [f"ip daddr {SLIRP_DNS} udp dport 53 accept", f"ip daddr {SLIRP_DNS} tcp dport 53 accept"]
    output = [
        "type filter hook output priority filter; policy drop;",
        'oifname "lo" accept',
        *dns,
        *_match(always, "goto refuse"),
        *_match(policy.host, "goto refuse"),
        *_match(policy.deny, "goto refuse"),
        *_match(policy.operator_ranges, "goto allowlist"),
        *_match(private, "goto refuse"),
        "goto allowlist",
    ]
    learned = ["ip daddr @dyn_allow_v4 accept", "ip6 daddr @dyn_allow_v6 accept"] if policy.guarded else []
    allowlist = ["accept"] if policy.allow is None else [*learned, *_match(policy.allow, "accept"), "goto refuse"]
    sets = (
        "  set dyn_allow_v4 {\n    type ipv4_addr\n    flags timeout\n  }\n"
        "  set dyn_allow_v6 {\n    type ipv6_addr\n    flags timeout\n  }\n"
        if policy.guarded
        else ""
    )
    refuse = ["meta l4proto tcp reject with tcp reset", "reject with icmpx type admin-prohibited"]

    def chain(name: str, rules: list[str]) -> str:
        return f"  chain {name} {{\n" + "".join(f"    {r}\n" for r in rules) + "  }\n"

    # Chains that are jumped to must be declared before the rules naming them.
    return (
        f"table inet {TABLE} {{\n"
        + sets
        + chain("refuse", refuse)
        + chain("allowlist", allowlist)
        + chain("output", output)
        + "}\n"
    )


@dataclass(frozen=True)
class Slirp:
    """The slirp4netns process of one sandbox (and its dns_guard.py, if any), as recorded in network.json."""

    pid: int
    pid_start: int
    guard_pid: int = 0
    guard_start: int = 0


def _save(directory: Path, slirp: Slirp) -> None:
    tmp = directory / (NETWORK_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(
            {
                "slirp_pid": slirp.pid,
                "slirp_start": slirp.pid_start,
                "guard_pid": slirp.guard_pid,
                "guard_start": slirp.guard_start,
            },
            f,
        )
    os.replace(tmp, directory / NETWORK_FILE)


def load(directory: Path) -> Slirp | None:
    """The recorded slirp4netns of the sandbox in `directory`, if it has one."""
    try:
        raw = json.loads((directory / NETWORK_FILE).read_text())
        return Slirp(
            int(raw["slirp_pid"]), int(raw["slirp_start"]), int(raw.get("guard_pid", 0)), int(raw.get("guard_start", 0))
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def install_rules(init_pid: int, rules: str) -> None:
    """Load `rules` into the network namespace of `init_pid` (blocking)."""
    done = subprocess.run(
        ["nsenter", f"--net=/proc/{init_pid}/ns/net", "--", "nft", "-f", "-"],
        input=rules,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError_(f"could not install the egress rules: {done.stderr.strip()[-500:]}")


def _wait_blocked(init_pid: int, block_fd: int, timeout: float) -> None:
    """Return once `init_pid` sits in read() on its --block-fd, i.e. bubblewrap finished its own setup.

    bubblewrap reads the block fd at the very end of the sandbox's setup, after it configured the
    namespace's loopback over netlink; touching the namespace before that raced with it (measured:
    about one INTERNET create in five failed with "loopback: Failed RTM_NEWADDR").
    """
    read_nr = _READ_SYSCALL.get(os.uname().machine)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if read_nr is not None:
                fields = Path(f"/proc/{init_pid}/syscall").read_text().split()
                if len(fields) > 1 and fields[0] == str(read_nr) and int(fields[1], 16) == block_fd:
                    return
            elif "pipe_read" in Path(f"/proc/{init_pid}/wchan").read_text():
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError_("the sandbox did not reach the point where its network is set up")
        time.sleep(0.001)


def attach(
    directory: Path,
    init_pid: int,
    block_fd: int,
    policy: Policy,
    uid: int,
    gid: int,
    cgroup_procs: Sequence[str] = (),
    timeout: float = 10.0,
    mark: str = "",
) -> Slirp:
    """Rules first, then slirp4netns on the sandbox's namespace; returns once its tap0 is configured (blocking).

    `init_pid` is the sandbox's PID 1, blocked on `block_fd` (its number inside the sandbox too)
    until the caller releases it. Its
    pidfd is slirp's exit fd: PID 1's end is the sandbox's end (the pid namespace goes with it),
    and its parent (the outer bubblewrap, or init when that was killed) reaps it at once, which
    is when a pidfd becomes readable. The outer bubblewrap's own pidfd would not do: killing it
    leaves the sandbox running, and as instance_svc's child it stays an unreaped zombie.
    """
    _wait_blocked(init_pid, block_fd, timeout)
    install_rules(init_pid, ruleset(policy))
    # The sandbox's mark (procscan.MARK_ENV) lets the start-up sweep find a helper no file recorded.
    env = {**_HELPER_ENV, procscan.MARK_ENV: mark} if mark else _HELPER_ENV
    ready_r, ready_w = os.pipe()
    exit_fd = os.pidfd_open(init_pid)
    try:
        with open(directory / "slirp.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    "slirp4netns",
                    "--configure",
                    f"--mtu={_MTU}",
                    "--disable-host-loopback",
                    "--enable-sandbox",
                    "--enable-seccomp",
                    f"--exit-fd={exit_fd}",
                    f"--ready-fd={ready_w}",
                    "--netns-type=path",
                    f"/proc/{init_pid}/ns/net",
                    TAP,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(exit_fd, ready_w),
                start_new_session=True,  # outlives instance_svc, like its sandbox
                cwd="/",
                env=env,
            )
        _children[proc.pid] = proc
        _join_cgroups(proc.pid, cgroup_procs)
        os.close(ready_w)
        ready_w = -1
        start = procscan.start_time(proc.pid)
        slirp = Slirp(proc.pid, start or 0)
        # Recorded before waiting, so that a failed start still finds it to kill.
        _save(directory, slirp)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([ready_r], [], [], 0.05)
            if ready and os.read(ready_r, 16):
                if policy.guarded:
                    slirp = _start_guard(directory, slirp, init_pid, policy, uid, gid, cgroup_procs, deadline, env)
                return slirp
            if ready or proc.poll() is not None:
                break
        raise RuntimeError_(f"slirp4netns did not configure the sandbox's network: {_log_tail(directory)}")
    finally:
        os.close(exit_fd)
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)


def _start_guard(
    directory: Path,
    slirp: Slirp,
    init_pid: int,
    policy: Policy,
    uid: int,
    gid: int,
    cgroup_procs: Sequence[str],
    deadline: float,
    env: dict[str, str],
) -> Slirp:
    """Start dns_guard.py in the sandbox's namespace as the sandbox uid; returns once it listens (blocking)."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        raise RuntimeError_("egress rules with host names need the host's /usr/bin/python3 (for dns_guard.py)")
    ready_r, ready_w = os.pipe()
    try:
        with open(directory / "dns_guard.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    "nsenter",
                    f"--net=/proc/{init_pid}/ns/net",
                    "--",
                    "setpriv",
                    f"--reuid={uid}",
                    f"--regid={gid}",
                    "--clear-groups",
                    "--",
                    python,
                    "-I",
                    "-S",
                    "-c",
                    _GUARD_SOURCE,
                    f"--init-pid={init_pid}",
                    f"--ready-fd={ready_w}",
                    f"--upstream={policy.dns_upstream}",
                    f"--mark={GUARD_MARK:#x}",
                    f"--table={TABLE}",
                    *(f"--allow={name}" for name in policy.allow_names),
                    *(f"--deny={name}" for name in policy.deny_names),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(ready_w,),
                start_new_session=True,
                cwd="/",
                env=env,
            )
        _children[proc.pid] = proc
        _join_cgroups(proc.pid, cgroup_procs)
        os.close(ready_w)
        ready_w = -1
        slirp = dataclasses.replace(slirp, guard_pid=proc.pid, guard_start=procscan.start_time(proc.pid) or 0)
        _save(directory, slirp)
        while time.monotonic() < deadline:
            ready, _, _ = select.select([ready_r], [], [], 0.05)
            if ready and os.read(ready_r, 16):
                return slirp
            if ready or proc.poll() is not None:
                break
        raise RuntimeError_(f"the sandbox's DNS guard did not start: {_log_tail(directory, name='dns_guard.log')}")
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)


def _join_cgroups(pid: int, procs_files: Sequence[str]) -> None:
    """Put a helper of the sandbox into the sandbox's cgroups: the CPU, memory and threads the
    tenant's traffic makes it use count against the instance, the freezer pauses it with the
    sandbox, and teardown's cgroup sweep kills it. Best effort: it may already have exited."""
    for path in procs_files:
        with contextlib.suppress(OSError):
            Path(path).write_text(str(pid))


def stop(directory: Path) -> None:
    """Kill the sandbox's slirp4netns and DNS guard if they still run (idempotent; blocking)."""
    slirp = load(directory)
    if slirp is None:
        return
    for pid, start in ((slirp.pid, slirp.pid_start), (slirp.guard_pid, slirp.guard_start)):
        if pid:
            _kill(pid, start)


def _kill(pid: int, start: int) -> None:
    child = _children.pop(pid, None)
    if child is not None:
        # Our own child: kill and reap it (it may already have exited with its sandbox).
        if child.poll() is None:
            child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)
    elif procscan.start_time(pid) == start:
        # Started by an earlier instance_svc (re-adopted sandbox): init reaps it.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _log_tail(directory: Path, limit: int = 800, name: str = "slirp.log") -> str:
    try:
        text = (directory / name).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-limit:].strip() or "(empty log)"
