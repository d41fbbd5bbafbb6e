"""Output fan-out of one process: a bounded replay ring and bounded per-subscriber queues.

Pure data structures (no I/O, no sockets), driven by the event loop thread only, so no locks.

Rules
-----
* The ring keeps the most recent output (at most `ring_bytes` of payload, oldest chunks dropped
  first) so that a late `ConnectProcess` / PTY attach can replay what scrolled by.
* Every subscriber has its own queue bounded in bytes. `push` never blocks: a subscriber whose
  queue would grow past its limit is marked `overflowed` and receives nothing more; its stream
  ends with RESOURCE_EXHAUSTED (the client may reattach and replay the ring). A slow consumer
  therefore never blocks the process nor the other consumers.
* One subscriber may be the *pacer* (the foreground `StartProcess` stream): the process's reader
  asks `above_high_water()` after each chunk and stops reading the pipe while the pacer's queue is
  above its high-water mark, which applies back-pressure to the process itself through the pipe
  instead of dropping bytes. The pacer never overflows.
* A terminal's readers are all pacers, together (`pace_terminal`, `TerminalPacing`): the
  terminal's output goes at the pace of its slowest reader that is still reading, so nothing is
  lost and the program writing blocks in the kernel's tty buffer, as with exec. A reader that
  took nothing for `wait_seconds` while it had output waiting no longer holds the others back;
  if someone else is reading, it is detached alone (its stream ends with RESOURCE_EXHAUSTED and
  a message saying why) once it took nothing for `stall_seconds` or fell `behind_bytes` behind.
  When nobody reads, the terminal waits for them all and nobody is detached: a slow reader never
  hangs up a terminal.
* The terminal event (`Exited`) is always delivered, beyond any limit, and is the last one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

STDOUT = 1
STDERR = 2


@dataclass(frozen=True)
class Chunk:
    """Bytes a process wrote on `fd` (STDOUT or STDERR; a terminal's output counts as STDOUT)."""

    fd: int
    data: bytes


@dataclass(frozen=True)
class Exited:
    """How a process ended; always the last event of a subscription."""

    exit_code: int
    signal: int
    timed_out: bool
    error: str
    end_time: float
    out_of_memory: bool = False  # the kernel's OOM killer killed it (or a process it started)


Event = Chunk | Exited


class Ring:
    """The last `limit` bytes of output, kept as whole chunks (the oldest chunk goes first)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: deque[Chunk] = deque()
        self._size = 0

    def append(self, chunk: Chunk) -> None:
        """Keep `chunk`, dropping the oldest chunks beyond the limit."""
        if self._limit <= 0:
            return
        if len(chunk.data) > self._limit:
            chunk = Chunk(chunk.fd, chunk.data[-self._limit :])
        self._chunks.append(chunk)
        self._size += len(chunk.data)
        while self._size > self._limit:
            self._size -= len(self._chunks.popleft().data)

    def snapshot(self) -> list[Chunk]:
        """The buffered chunks, oldest first."""
        return list(self._chunks)

    @property
    def size(self) -> int:
        """Bytes currently buffered."""
        return self._size


class Subscriber:
    """One consumer's queue of events, bounded in bytes (see the module rules)."""

    def __init__(self, limit: int, *, pacer: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.pacer = pacer
        self.overflowed = False
        self._events: deque[Event] = deque()
        self._pending = 0
        self._finished = False
        self.closed = False
        self._failure: BaseException | None = None
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._clock = clock
        # Since when output has been waiting for this consumer without it taking any: set when a
        # chunk lands in an empty queue, moved on by every take, None while nothing waits.
        self._waiting_since: float | None = None

    @property
    def pending(self) -> int:
        """Payload bytes queued and not yet taken."""
        return self._pending

    def idle(self, now: float) -> float:
        """Seconds the consumer has had output waiting and taken none of it (0 when nothing waits)."""
        return 0.0 if self._waiting_since is None else max(0.0, now - self._waiting_since)

    def push(self, event: Event) -> None:
        """Queue `event` without ever blocking; overflow marks the subscriber and stops delivery."""
        if self._finished or self.overflowed or self._failure is not None:
            return
        if isinstance(event, Exited):
            self._events.append(event)
            self._finished = True
        else:
            if not self.pacer and self._pending + len(event.data) > self.limit:
                self.overflowed = True
                self._drop()
                return
            if self._waiting_since is None:
                self._waiting_since = self._clock()
            self._events.append(event)
            self._pending += len(event.data)
        self._wake.set()

    def _drop(self) -> None:
        self._events.clear()
        self._pending = 0
        self._waiting_since = None
        self._wake.set()
        self._drained.set()

    def detach(self, error: BaseException) -> None:
        """Cut the consumer off: drop its queue, accept nothing more; its next `get` raises `error`."""
        self._failure = error
        self._drop()

    def close(self) -> None:
        """The consumer left: release a reader waiting for it to drain."""
        self.closed = True
        self._drained.set()

    def interrupt(self, error: BaseException) -> None:
        """End the subscription early: the next `get` raises `error` (e.g. a bad client message)."""
        self._failure = error
        self._wake.set()

    def above_high_water(self) -> bool:
        """True while a pacer's queue holds more than its limit: the reader should pause."""
        return self.pacer and self._pending > self.limit

    async def wait_drained(self) -> None:
        """Wait until the queue is at or below half its limit (or the subscriber is done)."""
        while self._pending > self.limit // 2 and not self.overflowed and not self.closed and self._failure is None:
            self._drained.clear()
            await self._drained.wait()

    async def get(self, idle_seconds: float) -> Event | None:
        """The next event, or None after `idle_seconds` of silence (time for a keepalive).

        Raises `Overflow` once the subscriber fell behind.
        """
        if self._failure is not None:
            raise self._failure
        if self.overflowed:
            raise Overflow
        if not self._events:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), idle_seconds)
            except TimeoutError:
                return None
            if self._failure is not None:
                raise self._failure
            if self.overflowed:
                raise Overflow
        event = self._events.popleft()
        if isinstance(event, Chunk):
            self._pending -= len(event.data)
            self._waiting_since = self._clock() if self._pending else None
            if self._pending <= self.limit // 2:
                self._drained.set()
        return event


class Collector(Subscriber):
    """A consumer that keeps the whole output instead of queueing events (for run-to-completion calls).

    It keeps at most `limit` bytes of stdout and stderr together and drops the rest (setting
    `truncated`), so it never pauses the process, never overflows, and its memory is bounded by the
    cap. `finished` resolves with the exit. Create it on the event loop.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.kept = 0
        self.truncated = False
        self.finished: asyncio.Future[Exited] = asyncio.get_running_loop().create_future()

    def push(self, event: Event) -> None:
        """Keep `event`'s bytes up to the cap; the exit resolves `finished`."""
        if isinstance(event, Exited):
            if not self.finished.done():  # a cancelled caller no longer waits
                self.finished.set_result(event)
            return
        data = event.data
        room = self.limit - self.kept
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        if data:
            (self.stdout if event.fd == STDOUT else self.stderr).extend(data)
            self.kept += len(data)

    def above_high_water(self) -> bool:
        """Never: a collector drops what exceeds its cap instead of slowing the process."""
        return False


class Overflow(Exception):
    """A subscriber fell further behind than its queue allows and was cut off."""


@dataclass(frozen=True)
class TerminalPacing:
    """How a terminal's output is paced to its readers (see `pace_terminal`).

    The defaults: a window of 512 KiB keeps a fast reader's pipeline full (a 64 KiB chunk is read
    in well under a millisecond on loopback) while bounding what still scrolls by after a Ctrl-C;
    2 s without a take is longer than any pause of a client that is reading (a GC pass, a
    terminal redrawing), far shorter than a person would wait; 30 s or 16 MiB behind is where a
    reader is more likely gone (a laptop asleep, a tab in the background) than slow, and what it
    missed is no longer worth replaying: it can attach again and replay the last MiB.
    """

    window_bytes: int = 512 * 1024  # a reader may lag this much before the terminal waits for it
    wait_seconds: float = 2.0  # a reader that took nothing this long no longer holds the others
    stall_seconds: float = 30.0  # ... and is detached after this long, if another reader reads
    behind_bytes: int = 16 * 1024 * 1024  # ... or once this far behind


@dataclass(frozen=True)
class TerminalPace:
    """What the terminal should do now (a decision of `pace_terminal`)."""

    blocking: Subscriber | None  # stop reading the terminal until this reader drains
    detach: list[tuple[Subscriber, str]]  # readers to cut off, with the message each one gets
    recheck_in: float | None  # seconds until the passing of time alone may change the decision


def pace_terminal(readers: Collection[Subscriber], pacing: TerminalPacing, now: float) -> TerminalPace:
    """The pacing rule of a terminal whose `readers` are pacers with a limit of `pacing.window_bytes`.

    Readers that took something within `wait_seconds` (or have nothing waiting) are *reading*.
    The terminal waits for the reading readers only, or for all of them when none is reading
    (nothing is lost, and nobody is detached, while nobody reads: the program just blocks, as
    under a foreground exec). A reader that is not reading, while another one is, is detached
    after `stall_seconds` without a take or beyond `behind_bytes` behind.
    """
    reading = [r for r in readers if r.idle(now) < pacing.wait_seconds]
    detach: list[tuple[Subscriber, str]] = []
    recheck: list[float] = []
    for r in readers:
        if not r.pending:
            continue
        idle = r.idle(now)
        if idle < pacing.wait_seconds:
            recheck.append(pacing.wait_seconds - idle)
        elif not reading:
            continue  # nobody reads: nobody is detached, the terminal waits
        elif idle >= pacing.stall_seconds:
            detach.append(
                (
                    r,
                    f"detached from the terminal: this reader read nothing for {pacing.stall_seconds:g} s "
                    "while other readers went on; the terminal still runs: attach again to replay its recent output",
                )
            )
        elif r.pending > pacing.behind_bytes:
            detach.append(
                (
                    r,
                    f"detached from the terminal: this reader fell more than {pacing.behind_bytes} bytes behind "
                    "the other readers; the terminal still runs: attach again to replay its recent output",
                )
            )
        else:
            recheck.append(pacing.stall_seconds - idle)
    paced = reading or readers
    blocking = next((r for r in paced if r.above_high_water()), None)
    return TerminalPace(blocking, detach, min(recheck) if recheck else None)
