"""Keeping the stack's services up: a child that dies is restarted, with back-off, for as long as `up` runs.

One thread per child waits for its process to exit, says why it ended (exit code or signal, the
last lines of its log), sleeps the back-off delay, starts it again and announces it only once it
answers its health check. A child that keeps dying is retried forever, the pause between attempts
growing to `Backoff.maximum`: `cyberdesk up` never gives up on a service, and never ends the
instances because of one (they are sandboxes of their own; instance_svc re-adopts them).

Who may start a process: only the child's thread, and only while holding `Child.lock` with the
supervisor not halted. `Supervisor.halt()` sets the halt flag and then takes every child's lock
once, so when it returns no thread is between "decided to spawn" and "stored the new process":
`Child.proc` is final and the launcher can stop it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen


@dataclass
class Backoff:
    """The delay before a restart: `initial`, doubling per death, at most `maximum`.

    It starts over at `initial` once the child has been healthy for `reset_after` seconds: a
    service that ran for an hour and then died is not punished for the crashes of the morning.
    """

    initial: float = 0.1
    maximum: float = 5.0
    reset_after: float = 30.0
    _next: float = field(default=0.0, init=False)

    def after_death(self, healthy_for: float | None) -> float:
        """The delay before restarting a child that was healthy for `healthy_for` s (None: never)."""
        if self._next == 0.0 or (healthy_for is not None and healthy_for >= self.reset_after):
            self._next = self.initial
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay


def describe_exit(returncode: int) -> str:
    """ "killed by SIGKILL" or "exited with code 3", from a Popen returncode."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Halted(Exception):
    """Raised from a readiness wait when the supervisor is halting (Ctrl-C)."""


# start() -> a new process; ready(proc, check) blocks until it serves (RuntimeError: it exited,
# TimeoutError: it did not become healthy), calling check() between attempts.
Start = Callable[[], "Popen[bytes]"]
Ready = Callable[["Popen[bytes]", Callable[[], None]], None]


@dataclass
class Child:
    """One supervised service: how to start it, how to know it serves, and its current process."""

    name: str
    log: Path
    start: Start
    ready: Ready
    proc: Popen[bytes]
    lock: threading.Lock = field(default_factory=threading.Lock)
    healthy_since: float | None = None  # time.monotonic() of the last successful readiness wait
    restarts: int = 0
    backoff: Backoff = field(default_factory=Backoff)


class Supervisor:
    """Restarts the children that die until `halt()`; reports through `say` and `on_change`."""

    # Deaths within Backoff.reset_after of starting, in a row, before the log says "crash loop".
    CRASH_LOOP = 3

    def __init__(self, say: Callable[[str], None], on_change: Callable[[], None]) -> None:
        self._say = say
        self._on_change = on_change
        self._halted = threading.Event()
        self._threads: list[threading.Thread] = []
        self.children: list[Child] = []

    def watch(self, child: Child) -> None:
        """Supervise `child` (already started and healthy) from now on."""
        child.healthy_since = time.monotonic()
        self.children.append(child)
        thread = threading.Thread(target=self._run, args=(child,), name=f"supervise-{child.name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def halt(self) -> None:
        """Stop restarting; on return every `Child.proc` is the last process that will exist."""
        self._halted.set()
        for child in self.children:
            with child.lock:
                pass

    def join(self, timeout: float = 5.0) -> None:
        """Wait for the threads (after `halt()` and after the children have been stopped)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _check(self) -> None:
        if self._halted.is_set():
            raise Halted()

    def _respawn(self, child: Child, delay: float) -> bool:
        """Start `child` again after `delay` (and again, backing off, while exec fails); False once halted."""
        while not self._halted.wait(delay):
            with child.lock:
                if self._halted.is_set():
                    return False
                child.healthy_since = None
                try:
                    child.proc = child.start()
                    return True
                except OSError as err:
                    # Not even exec'd (binary gone, out of pids): no exit code to wait for.
                    delay = child.backoff.after_death(None)
                    self._say(f"{child.name} could not be started ({err}); retrying in {delay:g} s")
        return False

    def _run(self, child: Child) -> None:
        quick_deaths = 0
        while True:
            proc = child.proc
            code = proc.wait()
            if self._halted.is_set():
                return
            died = time.monotonic()
            healthy_for = None if child.healthy_since is None else died - child.healthy_since
            quick_deaths = quick_deaths + 1 if healthy_for is None or healthy_for < child.backoff.reset_after else 0
            delay = child.backoff.after_death(healthy_for)
            ran = "before it became healthy" if healthy_for is None else f"after {healthy_for:.1f} s healthy"
            last = tail(child.log)
            self._say(
                f"{child.name} (pid {proc.pid}) {describe_exit(code)} {ran}; restarting in {delay:g} s"
                + (f"; last lines of {child.log}:\n{_indent(last)}" if last else "")
            )
            if quick_deaths >= self.CRASH_LOOP:
                self._say(
                    f"{child.name} is crash-looping ({quick_deaths} deaths in a row, each within "
                    f"{child.backoff.reset_after:g} s of its start); it is retried with back-off (at most "
                    f"{child.backoff.maximum:g} s apart) until it stays up or `cyberdesk up` stops"
                )
            if not self._respawn(child, delay):
                return
            child.restarts += 1
            try:
                self._on_change()
            except OSError as err:  # pids.json is for people and the next `up`: not worth a restart
                self._say(f"could not record the pid of {child.name}: {err}")
            try:
                child.ready(child.proc, self._check)
            except Halted:
                return
            except Exception as err:
                # It died while starting (the top of the loop reports it), or it runs but never
                # answered as it should: kill it, so that the loop sees an exit and retries.
                if child.proc.poll() is None:
                    self._say(f"{child.name} (pid {child.proc.pid}) is not healthy ({err}); killing it to retry")
                    child.proc.kill()
                continue
            child.healthy_since = time.monotonic()
            self._say(
                f"{child.name} is back (pid {child.proc.pid}, restart {child.restarts}), serving "
                f"{child.healthy_since - died:.2f} s after it died"
            )


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())
