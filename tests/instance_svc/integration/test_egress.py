"""Egress of INTERNET instances through a real instance_svc: its own namespace, slirp4netns, nft rules.

Traffic goes only to loopback, to the host's own addresses (which must refuse) and to test hosts
this module makes itself: network namespaces joined to the host by veth pairs, with addresses
from 198.18.0.0/15 (the benchmarking range: not in the platform's private list, so reachable by
default) and one from 100.64.0.0/10 (a private range: refused unless the operator allows it).
Every send to a test host is preceded by a check that the host routes it to that veth.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cyberdesk_proto.v1 import instance_pb2
from instance_svc.runtime.local import LocalOptions, procscan
from tests.instance_svc.conftest import Svc, meta, running

# A small server per test host: a TCP greeting on 8080, a UDP echo on 8081, each naming the host,
# and a DNS server on UDP 53 for the names of `_NAMES` (A records; NXDOMAIN for other names).
_NAMES = {
    "a.egress.test": "198.18.71.2",
    "www.a.egress.test": "198.18.71.2",
    "b.egress.test": "198.18.72.2",
    "egress.test": "198.18.72.2",
}
_SERVER = r"""
import socket, struct, sys, threading
name = sys.argv[1]
names = dict(arg.split("=") for arg in sys.argv[2:])
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind(("0.0.0.0", 53))
def resolve():
    while True:
        query, peer = dns.recvfrom(2048)
        i, labels = 12, []
        while query[i]:
            labels.append(query[i + 1 : i + 1 + query[i]].decode())
            i += 1 + query[i]
        qtype = struct.unpack("!H", query[i + 1 : i + 3])[0]
        addr = names.get(".".join(labels).lower())
        answers = b""
        if addr and qtype == 1:
            answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + socket.inet_aton(addr)
        flags = 0x8180 if addr else 0x8183
        header = query[:2] + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0)
        dns.sendto(header + query[12 : i + 5] + answers, peer)
threading.Thread(target=resolve, daemon=True).start()
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", 8080))
tcp.listen(16)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", 8081))
def echo():
    while True:
        data, peer = udp.recvfrom(2048)
        udp.sendto(name.encode() + b":" + data, peer)
threading.Thread(target=echo, daemon=True).start()
while True:
    conn, _ = tcp.accept()
    conn.sendall(f"hello-{name}\n".encode())
    conn.close()
"""
# Inside the sandbox: one UDP round trip; prints the reply or the error.
_UDP_CLIENT = (
    "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(3)\n"
    "try:\n"
    "    s.sendto(b'ping',(sys.argv[1],int(sys.argv[2]))); print(s.recvfrom(2048)[0].decode(errors='replace'))\n"
    "except OSError as e:\n"
    "    print('ERR', e)\n"
)
PYTHON = LocalOptions().python


@dataclass(frozen=True)
class NetnsHost:
    """One test host: a network namespace behind a veth pair, serving on `addr`."""

    name: str
    netns: str
    host_veth: str
    addr: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _routed_via(addr: str, veth: str) -> bool:
    """The host's route to `addr` goes out of `veth` (checked before anything is sent to a test host)."""
    out = subprocess.run(["ip", "-j", "route", "get", addr], capture_output=True, text=True, timeout=10)
    return out.returncode == 0 and json.loads(out.stdout)[0].get("dev") == veth


def _make_host(tag: str, name: str, host_addr: str, addr: str, plen: int) -> NetnsHost:
    netns, host_veth, peer = f"cde-{tag}-{name}", f"cde{tag}{name}h", f"cde{tag}{name}n"
    _ip("netns", "add", netns)
    _ip("link", "add", host_veth, "type", "veth", "peer", "name", peer)
    _ip("link", "set", peer, "netns", netns)
    _ip("addr", "add", f"{host_addr}/{plen}", "dev", host_veth)
    _ip("link", "set", host_veth, "up")
    _ip("-n", netns, "addr", "add", f"{addr}/{plen}", "dev", peer)
    _ip("-n", netns, "link", "set", peer, "up")
    _ip("-n", netns, "link", "set", "lo", "up")
    _ip("-n", netns, "route", "add", "default", "via", host_addr)
    return NetnsHost(name, netns, host_veth, addr)


@pytest.fixture(scope="module")
def test_hosts() -> Iterator[dict[str, NetnsHost]]:
    """Four test hosts (a, b, d: 198.18.0.0/15; p: 100.64.0.0/10), each running `_SERVER`; removed at the end."""
    if os.geteuid() != 0 or subprocess.run(["which", "ip"], capture_output=True).returncode != 0:
        pytest.fail("these tests need root and iproute2 (make setup)")
    tag = str(os.getpid() % 10000)
    made: list[NetnsHost] = []
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for name, host_addr, addr in (
            ("a", "198.18.71.1", "198.18.71.2"),
            ("b", "198.18.72.1", "198.18.72.2"),
            ("p", "100.64.71.1", "100.64.71.2"),
            ("d", "198.18.73.1", "198.18.73.2"),  # the resolver of test_dns_guard_*
        ):
            host = _make_host(tag, name, host_addr, addr, 30)
            made.append(host)
            servers.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", host.netns, sys.executable, "-c", _SERVER, name]
                    + [f"{k}={v}" for k, v in _NAMES.items()],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for host in made:
            assert _routed_via(host.addr, host.host_veth), f"no route to test host {host.addr} via {host.host_veth}"
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection((host.addr, 8080), timeout=1) as conn:
                        assert conn.recv(64) == f"hello-{host.name}\n".encode()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        yield {host.name: host for host in made}
    finally:
        for server in servers:
            server.kill()
            server.wait()
        for host in made:
            subprocess.run(["ip", "link", "del", host.host_veth], capture_output=True, timeout=10)
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=10)


@pytest.fixture
def svc(tmp_path: Path, redis_url: str) -> Iterator[Svc]:
    """instance_svc with the platform's Redis (redis_url) and no operator ranges."""
    with running(tmp_path, redis_url) as service:
        yield service


def _create(
    svc: Svc, network: instance_pb2.NetworkMode.ValueType = instance_pb2.NETWORK_MODE_INTERNET, **egress: list[str]
) -> instance_pb2.Instance:
    request = instance_pb2.CreateInstanceRequest(network=network, egress=instance_pb2.EgressPolicy(**egress))
    inst = svc.instances.CreateInstance(request, metadata=meta(), timeout=60).instance
    assert inst.state == instance_pb2.INSTANCE_STATE_RUNNING, inst.state_message
    return inst


def _tcp(svc: Svc, instance_id: str, addr: str, port: int) -> str:
    """Connect from inside the instance: what the peer sent first, or CLOSED when the connect failed."""
    script = f"exec 3<>/dev/tcp/{addr}/{port} && timeout 2 head -c 64 <&3"
    command = f"timeout 4 bash -c {shlex.quote(script)} 2>/dev/null || echo CLOSED"
    started = time.monotonic()
    code, out = svc.exec(instance_id, command)
    # Refused at once by the rules (a TCP reset or an ICMP error), never a hang until the timeout.
    assert time.monotonic() - started < 6
    assert code == 0
    return out.decode().strip()


def _udp(svc: Svc, instance_id: str, addr: str, port: int = 8081) -> str:
    code, out = svc.exec(instance_id, f"{PYTHON} -c {shlex.quote(_UDP_CLIENT)} {addr} {port}")
    assert code == 0
    return out.decode().strip()


def _slirp_pids(svc: Svc) -> dict[str, int]:
    """Sandbox id -> pid of its slirp4netns, from each sandbox's network.json."""
    found = {}
    for path in (svc.state / "instances").glob("*/network.json"):
        found[path.parent.name] = json.loads(path.read_text())["slirp_pid"]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_gone(pid: int, seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _host_address() -> str:
    """The host's own address on its main interface (not loopback, not a test veth)."""
    out = json.loads(subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True).stdout)
    for link in out:
        if link["ifname"] == "lo" or link["ifname"].startswith("cde"):
            continue
        for info in link.get("addr_info", []):
            return str(info["local"])
    pytest.fail("the host has no non-loopback IPv4 address to test against")


class _Listener:
    """A TCP listener on the host (all addresses) that greets each connection, in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"host-listener\n")

    def close(self) -> None:
        self.sock.close()


def test_internet_instance_reaches_test_hosts_but_never_the_host(svc: Svc, test_hosts: dict[str, NetnsHost]) -> None:
    listener = _Listener()
    try:
        host_addr = _host_address()
        redis_port = int(svc.env["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
        svc_port = int(svc.target.rsplit(":", 1)[1])
        # From the host every one of these answers: a refusal inside is the sandbox's rules.
        for addr, port in (("127.0.0.1", listener.port), (host_addr, listener.port), ("127.0.0.1", redis_port)):
            socket.create_connection((addr, port), timeout=2).close()
        inst = _create(svc)
        assert inst.network == instance_pb2.NETWORK_MODE_INTERNET

        a = test_hosts["a"]
        assert _routed_via(a.addr, a.host_veth)
        assert _tcp(svc, inst.instance_id, a.addr, 8080) == "hello-a"
        assert _udp(svc, inst.instance_id, a.addr) == "a:ping"

        for addr, port in (
            ("127.0.0.1", redis_port),  # the sandbox's own loopback: nothing there
            ("10.0.2.2", redis_port),  # slirp's gateway, which would be the host's loopback
            ("10.0.2.2", listener.port),
            ("10.0.2.2", svc_port),
            ("10.0.2.3", 80),  # slirp's resolver: port 53 only
            (host_addr, listener.port),  # the host's own address
            (host_addr, redis_port),
            (test_hosts["a"].addr.rsplit(".", 1)[0] + ".1", listener.port),  # the host's end of a veth
            ("169.254.169.254", 80),  # cloud metadata
        ):
            assert _tcp(svc, inst.instance_id, addr, port) == "CLOSED", f"{addr}:{port} was reachable"
        # A private range (100.64/10 here) stays refused without the operator's say.
        p = test_hosts["p"]
        assert _routed_via(p.addr, p.host_veth)
        assert _tcp(svc, inst.instance_id, p.addr, 8080) == "CLOSED"
        assert _udp(svc, inst.instance_id, p.addr).startswith("ERR")

        code, out = svc.exec(inst.instance_id, "cat /etc/resolv.conf; nft list ruleset 2>&1; ip -br link")
        text = out.decode()
        assert "nameserver 10.0.2.3" in text
        assert "cyberdesk_egress" not in text  # the tenant cannot even read the rules (no CAP_NET_ADMIN)
        code, _ = svc.exec(inst.instance_id, "nft flush ruleset")
        assert code != 0
    finally:
        listener.close()


def test_allowlist_admits_only_listed_hosts_and_deny_wins(svc: Svc, test_hosts: dict[str, NetnsHost]) -> None:
    a, b = test_hosts["a"], test_hosts["b"]
    assert _routed_via(a.addr, a.host_veth) and _routed_via(b.addr, b.host_veth)
    only_a = _create(svc, allow=[a.addr])
    assert list(only_a.egress.allow) == [a.addr] and not only_a.egress.deny
    got = svc.instances.GetInstance(instance_pb2.GetInstanceRequest(instance_id=only_a.instance_id), metadata=meta())
    assert list(got.instance.egress.allow) == [a.addr]
    assert _tcp(svc, only_a.instance_id, a.addr, 8080) == "hello-a"
    assert _tcp(svc, only_a.instance_id, b.addr, 8080) == "CLOSED"
    assert _udp(svc, only_a.instance_id, b.addr).startswith("ERR")

    # Both allowed as a range, the deny entry for b wins.
    deny_b = _create(svc, allow=["198.18.0.0/15"], deny=[b.addr])
    assert _tcp(svc, deny_b.instance_id, a.addr, 8080) == "hello-a"
    assert _tcp(svc, deny_b.instance_id, b.addr, 8080) == "CLOSED"
    # An allowlist cannot open what the platform denies.
    host_veth_end = a.addr.rsplit(".", 1)[0] + ".1"
    opened = _create(svc, allow=["0.0.0.0/0"])
    assert _tcp(svc, opened.instance_id, host_veth_end, 22) == "CLOSED"
    assert _tcp(svc, opened.instance_id, test_hosts["p"].addr, 8080) == "CLOSED"
    assert _tcp(svc, opened.instance_id, b.addr, 8080) == "hello-b"


def test_bad_egress_entries_are_invalid_argument_naming_the_entry(svc: Svc) -> None:
    for allow, deny, bad in (
        (["10.0.0.1/8"], [], "10.0.0.1/8"),
        ([], ["not a host"], "not a host"),
        (["x.*.com"], [], "x.*.com"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            svc.instances.CreateInstance(
                instance_pb2.CreateInstanceRequest(
                    network=instance_pb2.NETWORK_MODE_INTERNET, egress=instance_pb2.EgressPolicy(allow=allow, deny=deny)
                ),
                metadata=meta(),
                timeout=30,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad in (err.value.details() or "")
    assert _slirp_pids(svc) == {}


def test_a_none_instance_has_only_loopback(svc: Svc) -> None:
    inst = _create(svc, network=instance_pb2.NETWORK_MODE_NONE)
    code, out = svc.exec(inst.instance_id, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert code == 0 and out.decode().split() == ["lo"]
    assert _slirp_pids(svc) == {}


def test_operator_range_opens_a_private_range(tmp_path: Path, redis_url: str, test_hosts: dict[str, NetnsHost]) -> None:
    p = test_hosts["p"]
    with running(tmp_path, redis_url, egress_allow_ranges="100.64.71.0/24") as svc:
        inst = _create(svc)
        assert _routed_via(p.addr, p.host_veth)
        assert _tcp(svc, inst.instance_id, p.addr, 8080) == "hello-p"
        # The tenant's deny list still applies inside an operator range.
        denied = _create(svc, deny=["100.64.71.0/24"])
        assert _tcp(svc, denied.instance_id, p.addr, 8080) == "CLOSED"


def test_slirp_goes_with_its_sandbox_delete_restart_death_and_sweep(svc: Svc, test_hosts: dict[str, NetnsHost]) -> None:
    a = test_hosts["a"]
    assert _routed_via(a.addr, a.host_veth)
    first = _create(svc)
    pids = _slirp_pids(svc)
    assert len(pids) == 1
    (slirp,) = pids.values()
    assert _alive(slirp)
    svc.instances.DeleteInstance(instance_pb2.DeleteInstanceRequest(instance_id=first.instance_id), metadata=meta())
    assert _wait_gone(slirp), "slirp4netns outlived its deleted sandbox"

    # Re-adopted after kill -9 of instance_svc: the network still works, and a delete still ends slirp.
    # (A wildcard in the policy: its DNS guard is re-adopted and ended the same way.)
    kept = _create(svc, deny=["*.example.invalid"])
    svc.kill9()
    svc.start()
    assert _tcp(svc, kept.instance_id, a.addr, 8080) == "hello-a"
    (sandbox_id, slirp) = next(iter(_slirp_pids(svc).items()))
    guard = json.loads((svc.state / "instances" / sandbox_id / "network.json").read_text())["guard_pid"]
    assert _alive(guard)
    svc.instances.DeleteInstance(instance_pb2.DeleteInstanceRequest(instance_id=kept.instance_id), metadata=meta())
    assert _wait_gone(slirp), "slirp4netns outlived a sandbox deleted after a restart"
    assert _wait_gone(guard), "the DNS guard outlived a sandbox deleted after a restart"

    # A sandbox that dies on its own (its PID 1, the agent, killed) takes slirp with it, also while
    # no instance_svc watches it (killed here first; a watching one tears the sandbox down itself,
    # tests/faults/test_agent_death.py): slirp's exit fd is a pidfd of that PID 1. Also when the
    # outer bubblewrap was killed first. A wildcard (resolved by nobody at create) makes the DNS
    # guard run too; it waits on the same pidfd.
    dying = _create(svc, deny=["*.example.invalid"])
    sandbox_id, slirp = next(iter(_slirp_pids(svc).items()))
    state = json.loads((svc.state / "instances" / sandbox_id / "state.json").read_text())
    guard = json.loads((svc.state / "instances" / sandbox_id / "network.json").read_text())["guard_pid"]
    svc.kill9()
    os.kill(state["pid"], signal.SIGKILL)
    time.sleep(0.2)
    assert _alive(slirp) and _alive(guard)  # the sandbox still runs without its outer bubblewrap
    os.kill(state["init_pid"], signal.SIGKILL)
    assert _wait_gone(slirp, 5), "slirp4netns outlived its dead sandbox"
    assert _wait_gone(guard, 5), "the DNS guard outlived its dead sandbox"
    svc.start()
    got = svc.instances.GetInstance(instance_pb2.GetInstanceRequest(instance_id=dying.instance_id), metadata=meta())
    assert got.instance.state == instance_pb2.INSTANCE_STATE_FAILED, got

    # The stack's stop sweep (instance_svc already gone) ends both sandbox and slirp.
    _create(svc)
    (slirp,) = _slirp_pids(svc).values()
    svc.kill9()
    from cyberdesk_stack.launcher import sweep_sandboxes

    assert sweep_sandboxes(svc.state) == 1
    assert _wait_gone(slirp), "slirp4netns survived the stack's sweep"
    svc.start()  # so that the fixture's stop finds a process


def test_dns_guard_learns_wildcard_names_and_refuses_denied_ones(
    tmp_path: Path, redis_url: str, test_hosts: dict[str, NetnsHost]
) -> None:
    a, b, d = test_hosts["a"], test_hosts["b"], test_hosts["d"]
    for host in (a, b, d):
        assert _routed_via(host.addr, host.host_veth)
    # The test's resolver (test host d) stands in for the host's: the guard's upstream.
    with running(tmp_path, redis_url, egress_dns_upstream=d.addr) as svc:
        inst = _create(svc, allow=["*.egress.test"], deny=["b.egress.test"])
        assert list(inst.egress.allow) == ["*.egress.test"]
        code, out = svc.exec(inst.instance_id, "cat /etc/resolv.conf")
        assert out.decode().split() == ["nameserver", "127.0.0.53"]
        # Nothing is reachable before its name was asked for.
        assert _tcp(svc, inst.instance_id, a.addr, 8080) == "CLOSED"
        code, out = svc.exec(inst.instance_id, "getent hosts www.a.egress.test")
        assert code == 0 and out.decode().split() == [a.addr, "www.a.egress.test"]
        assert _tcp(svc, inst.instance_id, a.addr, 8080) == "hello-a"
        # A denied name is refused by the guard; the apex is answered but is no subdomain.
        code, out = svc.exec(inst.instance_id, "getent hosts b.egress.test")
        assert code != 0 and not out.strip()
        code, out = svc.exec(inst.instance_id, "getent hosts egress.test")
        assert code == 0 and out.decode().split()[0] == b.addr
        assert _tcp(svc, inst.instance_id, b.addr, 8080) == "CLOSED"
        # The tenant cannot ask a resolver itself: only the guard's marked sockets reach port 53.
        assert _udp(svc, inst.instance_id, d.addr, 53).startswith("ERR")
        assert _udp(svc, inst.instance_id, "10.0.2.3", 53).startswith("ERR")
        # The guard goes with its sandbox, like slirp4netns.
        raw = json.loads(next((svc.state / "instances").glob("*/network.json")).read_text())
        assert _alive(raw["guard_pid"])
        svc.instances.DeleteInstance(instance_pb2.DeleteInstanceRequest(instance_id=inst.instance_id), metadata=meta())
        assert _wait_gone(raw["guard_pid"]) and _wait_gone(raw["slirp_pid"])


def test_network_helpers_count_against_the_instance_and_pause_with_it(
    svc: Svc, test_hosts: dict[str, NetnsHost]
) -> None:
    a = test_hosts["a"]
    assert _routed_via(a.addr, a.host_veth)
    inst = _create(svc, allow=[a.addr, "*.egress.test"])  # a name: the DNS guard runs too
    (sandbox_id,) = _slirp_pids(svc)
    raw = json.loads((svc.state / "instances" / sandbox_id / "network.json").read_text())
    cgroups = json.loads((svc.state / "instances" / sandbox_id / "state.json").read_text())["cgroups"]
    assert cgroups, "this host gives no cgroups"
    for path in cgroups.values():
        members = {int(p) for p in Path(path, "cgroup.procs").read_text().split()}
        assert {raw["slirp_pid"], raw["guard_pid"]} <= members, path
    # Neither helper inherits instance_svc's environment (its internal token, Redis URL, ...); each
    # carries only its sandbox's mark, by which the start-up sweep finds it (procscan.MARK_ENV).
    for pid in (raw["slirp_pid"], raw["guard_pid"]):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"CYBERDESK_SANDBOX_MARK={procscan.mark(svc.state / 'instances', sandbox_id)}".encode() in environ
        others = [v for v in environ if not v.startswith(b"CYBERDESK_SANDBOX_MARK=")]
        assert not [v for v in others if v.startswith((b"CYBERDESK_", b"REDIS_URL"))], environ
    request = instance_pb2.PauseInstanceRequest(instance_id=inst.instance_id)
    svc.instances.PauseInstance(request, metadata=meta(), timeout=30)
    svc.instances.ResumeInstance(
        instance_pb2.ResumeInstanceRequest(instance_id=inst.instance_id), metadata=meta(), timeout=30
    )
    # slirp4netns was frozen and thawed with the sandbox: the network works again at once.
    assert _tcp(svc, inst.instance_id, a.addr, 8080) == "hello-a"
