"""`cyberdesk up` supervises: a killed service comes back, the instances never notice; Ctrl-C ends or keeps them.

Every service is killed with SIGKILL under a real `cyberdesk up` while an instance runs a
background process; the launcher must stay up, restart the service, and the same instance must
still be RUNNING with its process, reachable through the gateway. Then the two Ctrl-C policies:
`--on-exit keep` leaves the sandboxes running for the next `up` to re-adopt, `--on-exit end`
leaves no sandbox process behind and records the instance's end at the time of the stop.

The tests of this module are one user's session on one state directory, in file order (each
`up` costs seconds): the kills run under an `up --on-exit keep`, whose Ctrl-C the keep test
checks, starting the next `up` (the default, end); that one is killed with SIGKILL and the next
`up` has to clean up after it; the end test presses Ctrl-C on that last one. A test that finds
the session in another state than it expects (an earlier one failed) starts its own `up`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from cyberdesk import Cyberdesk, CyberdeskError, Instance
from cyberdesk_common.lifecycle_events import STREAM
from cyberdesk_stack.processes import redis_url, wait_healthy
from cyberdesk_stack.supervisor import Backoff, describe_exit
from instance_svc.states import State
from instance_svc.store import Store
from tests.faults.conftest import StartUp
from tests.faults.up import Up

pytestmark = pytest.mark.sandbox

T = TypeVar("T")


def _eventually(what: str, attempt: Callable[[], T], timeout: float = 15.0) -> T:
    """`attempt()`'s first result that does not raise, within `timeout` s (a restarted hop may refuse a call or two)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except (CyberdeskError, AssertionError) as err:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still failing after {timeout:g} s: {err}") from err
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _host_pids(needle: str, comm: str = "") -> list[int]:
    """Live host pids whose command line contains `needle` (sandboxed ones too) and, if given, named `comm`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                name = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if needle in cmdline and (not comm or name == comm) and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


@dataclass
class Workload:
    """An instance with a background `sleep` whose argument no other process on the host has."""

    instance: Instance
    command: str
    pid: int  # inside the sandbox
    host_pids: list[int]

    def check_intact(self, client: Cyberdesk) -> None:
        """RUNNING, exec works through the gateway, the background process is the same one."""
        got = _eventually("GetInstance", lambda: client.instances.get(self.instance.id))
        assert got.state == "RUNNING", got.data
        result = _eventually("exec", lambda: got.exec("echo alive"))
        assert (result.exit_code, result.stdout) == (0, b"alive\n")
        running = [p.pid for p in got.processes() if p.exited is None and self.command in " ".join(p.argv)]
        assert running == [self.pid]
        assert all(_alive(pid) for pid in self.host_pids), self.host_pids


def _workload(client: Cyberdesk) -> Workload:
    instance = client.instances.create(timeout=600)
    command = f"sleep {4000 + secrets.randbelow(10**6)}.5"
    process = instance.start(command)
    deadline = time.monotonic() + 15
    # The sleep itself, not a shell that is starting it (and may exec it or exit meanwhile).
    while not (host := _host_pids(command, comm="sleep")):
        assert time.monotonic() < deadline, f"{command} not found in /proc"
        time.sleep(0.1)
    return Workload(instance, command, process.pid, host)


# --- pure ------------------------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_healthy_run() -> None:
    backoff = Backoff(initial=0.1, maximum=0.5, reset_after=30)
    assert [backoff.after_death(None) for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff.after_death(29.0) == 0.5  # healthy, but not for long: still backing off
    assert backoff.after_death(31.0) == 0.1
    assert backoff.after_death(1.0) == 0.2


def test_exit_is_described_by_signal_name_or_code() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"


# --- the session -----------------------------------------------------------------------------


class Session:
    """The current `up` on the module's state directory, and the workload created under the first."""

    def __init__(self, start_up: StartUp, state_dir: Path) -> None:
        self._start_up = start_up
        self.state_dir = state_dir
        self.up = start_up(state_dir, on_exit="keep")
        self.client = self.up.client()
        self.work = _workload(self.client)

    def next_up(self, on_exit: str | None = None) -> Up:
        """Stop the current `up` (if it still runs) and start another on the same state directory and ports."""
        self.client.close()
        if self.up.proc.poll() is None:
            self.up.stop()
        self.up = self._start_up(self.state_dir, on_exit=on_exit, ports=self.up.ports)
        self.client = self.up.client()
        return self.up


@pytest.fixture(scope="module")
def session(start_up: StartUp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    current = Session(start_up, tmp_path_factory.mktemp("up") / "state")
    yield current
    current.client.close()


# --- kill -9 under `up` ----------------------------------------------------------------------


def _recent_events(stream: redis.Redis) -> list[tuple[bytes, dict[bytes, bytes]]]:
    entries: list[tuple[bytes, dict[bytes, bytes]]] = stream.xrevrange(STREAM, count=20)  # type: ignore[assignment]
    return entries


def _recent_event_values(stream: redis.Redis) -> bytes:
    return b" ".join(value for _, fields in _recent_events(stream) for value in fields.values())


_HEALTH = {"instance_svc": "instance", "gateway_svc": "gateway", "billing_svc": "billing"}


@pytest.mark.parametrize("name", ["instance_svc", "gateway_svc", "billing_svc", "redis"])
def test_a_killed_service_is_restarted_and_the_instance_survives(session: Session, name: str) -> None:
    up, work = session.up, session.work
    password = (up.state_dir / "redis_password").read_text().strip()
    stream = redis.Redis.from_url(redis_url(up.ports["redis"], password))
    try:
        events_before = _recent_events(stream)
        old = up.pids()[name]
        mark = len(up.output)
        os.kill(old, signal.SIGKILL)
        up.wait_output(f"{name} is back", 60, after=mark)
        assert f"{name} (pid {old}) killed by SIGKILL" in up.output[mark:]
        assert up.proc.poll() is None, up.output
        new = up.pids()[name]
        assert new != old and _alive(new)
        if name in _HEALTH:
            wait_healthy(f"127.0.0.1:{up.ports[_HEALTH[name]]}", timeout=1)
        work.check_intact(session.client)
        if name == "redis":
            # The append-only file brought the event stream back...
            last_id = events_before[0][0]
            assert stream.xrange(STREAM, min=last_id, max=last_id)
            # ...and both Redis clients of the stack reconnected: instance_svc publishes again,
            # the gateway follows the stream again.
            extra = session.client.instances.create(timeout=60)
            extra.delete()
            deadline = time.monotonic() + 15
            while extra.id.encode() not in _recent_event_values(stream):
                assert time.monotonic() < deadline, "instance_svc did not publish to the restarted Redis"
                time.sleep(0.2)
            gateway_log = (up.state_dir / "logs" / "gateway_svc.log").read_text()
            assert "following lifecycle events again" in gateway_log.rsplit("not following lifecycle events", 1)[-1]
    finally:
        stream.close()


def test_a_crash_looping_service_is_retried_with_backoff_and_up_stays(session: Session) -> None:
    """billing_svc killed, its port then held by another socket: every restart fails until the port is free."""
    up = session.up
    port = up.ports["billing"]
    mark = len(up.output)
    with socket.socket() as squatter:
        # SO_REUSEADDR: the killed billing_svc's connections (the gateway's, instance_svc's) leave
        # TIME-WAIT sockets on its port, which would refuse a plain bind for a minute.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Without SO_REUSEPORT: the new billing_svc's gRPC server cannot bind beside it. The
        # supervisor may restart billing_svc before the squatter binds (it listens again within
        # its back-off); then that one is killed too, and the growing back-off leaves a gap.
        deadline = time.monotonic() + 30
        bound = False
        while not bound:
            assert time.monotonic() < deadline, "the port was never free between billing_svc's restarts"
            with contextlib.suppress(ProcessLookupError, KeyError):
                os.kill(up.pids()["billing_svc"], signal.SIGKILL)
            gap = time.monotonic() + 2
            while time.monotonic() < gap:
                try:
                    squatter.bind(("127.0.0.1", port))
                    bound = True
                    break
                except OSError:  # the killed one's socket lingering, or its successor listening
                    time.sleep(0.005)
        squatter.listen()
        up.wait_output("billing_svc is crash-looping (3 deaths in a row", 60, after=mark)
        assert up.proc.poll() is None
    looped = up.output[mark:]
    assert "exited with code 1 before it became healthy; restarting in" in looped
    delays = [float(d) for d in re.findall(r"restarting in ([0-9.]+) s", looped)]
    assert len(delays) >= 2 and delays == sorted(delays) and delays[-1] >= 2 * delays[0], delays  # 0.1, 0.2, 0.4...
    assert "Address already in use" in looped or "Failed to bind" in looped  # its log's last lines
    up.wait_output("billing_svc is back", 60, after=mark)
    wait_healthy(f"127.0.0.1:{port}", timeout=1)
    session.work.check_intact(session.client)


# --- Ctrl-C ----------------------------------------------------------------------------------


def test_ctrl_c_with_keep_leaves_the_sandboxes_for_the_next_up(session: Session) -> None:
    first, work = session.up, session.work
    assert first.proc.poll() is None, "the session's first `up` (--on-exit keep) is gone"
    expire = session.client.instances.get(work.instance.id).data.expire_time
    services = [pid for name, pid in first.pids().items() if name != "up"]
    assert first.stop() == 0
    assert "1 sandbox(es) keep running" in first.output
    assert not any(_alive(pid) for pid in services)
    assert all(_alive(pid) for pid in work.host_pids)

    session.next_up()  # the default: --on-exit end
    work.check_intact(session.client)
    assert session.client.instances.get(work.instance.id).data.expire_time == expire


def test_the_next_up_stops_what_a_killed_up_left_and_readopts_the_instances(session: Session) -> None:
    """kill -9 of `up` itself leaves its children serving (their own process groups) and holding the
    ports; the next `up` must stop them, start its own, and find the instance as it was."""
    before, work = session.up, session.work
    assert before.proc.poll() is None
    children = {name: pid for name, pid in before.pids().items() if name != "up"}
    os.kill(before.proc.pid, signal.SIGKILL)
    before.proc.wait(30)
    assert all(_alive(pid) for pid in children.values())

    after = session.next_up()
    assert "stopped what an earlier `cyberdesk up`" in after.output
    assert not [(name, pid) for name, pid in children.items() if _alive(pid)], after.output
    assert set(after.pids().values()).isdisjoint(children.values())
    work.check_intact(session.client)


def test_ctrl_c_with_end_ends_the_instances_at_the_stop(session: Session) -> None:
    up, work = session.up, session.work
    if up.proc.poll() is not None or "--on-exit" in " ".join(map(str, up.proc.args)):  # type: ignore[arg-type]
        up = session.next_up()  # an earlier test left no `up --on-exit end` running
        work = _workload(session.client)
    session.client.close()
    stopped_at = time.time()
    assert up.stop() == 0
    exited_at = time.time()
    state = str(session.state_dir)
    deadline = time.monotonic() + 10  # helpers (slirp4netns, the DNS guard) exit once PID 1 is gone
    while _host_pids(state) or any(_alive(pid) for pid in work.host_pids):
        assert time.monotonic() < deadline, (_host_pids(state), work.host_pids)
        time.sleep(0.2)
    # The record as the stopped stack left it; the next `up` serves it as it is (its start-up only
    # revisits live records), so it is read here rather than through one more start of the stack.
    store = Store(session.state_dir / "instance_svc.db")
    try:
        ended = store.get(work.instance.id)
    finally:
        store.close()
    assert ended is not None and ended.state is State.TERMINATED, ended
    # Ended by the stop (not at some later start): between Ctrl-C and the exit of `up`.
    assert stopped_at * 1e6 <= ended.end_time_us <= exited_at * 1e6, (ended, stopped_at, exited_at)
