"""The output fan-out alone: the replay ring, bounded subscriber queues, the pacer, the collector,
and the pacing rule of a terminal's readers (on a clock of the test's own).

In-process, on an event loop of the test's own (no process, no socket): each rule of
`guest_agent._fanout`'s docstring is checked by pushing events by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from guest_agent._fanout import (
    STDERR,
    STDOUT,
    Chunk,
    Collector,
    Exited,
    Overflow,
    Ring,
    Subscriber,
    TerminalPacing,
    pace_terminal,
)

EXITED = Exited(exit_code=0, signal=0, timed_out=False, error="", end_time=1.0)


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


def _out(data: bytes) -> Chunk:
    return Chunk(STDOUT, data)


# -- ring ------------------------------------------------------------------------------------------


def test_ring_keeps_the_latest_whole_chunks_within_its_limit() -> None:
    ring = Ring(10)
    for data in (b"aaaa", b"bbbb", b"cccc"):
        ring.append(_out(data))
    # 12 bytes do not fit in 10: the oldest chunk goes, whole.
    assert [c.data for c in ring.snapshot()] == [b"bbbb", b"cccc"]
    assert ring.size == 8
    ring.append(Chunk(STDERR, b"dd"))
    assert [(c.fd, c.data) for c in ring.snapshot()] == [(STDOUT, b"bbbb"), (STDOUT, b"cccc"), (STDERR, b"dd")]
    assert ring.size == 10
    ring.append(_out(b"e"))  # one byte over: the oldest chunk goes
    assert [c.data for c in ring.snapshot()] == [b"cccc", b"dd", b"e"]
    assert ring.size == 7


def test_a_chunk_larger_than_the_ring_keeps_its_tail() -> None:
    ring = Ring(4)
    ring.append(_out(b"old"))
    ring.append(Chunk(STDERR, b"0123456789"))
    assert ring.snapshot() == [Chunk(STDERR, b"6789")]
    assert ring.size == 4


def test_a_ring_of_zero_bytes_keeps_nothing() -> None:
    ring = Ring(0)
    ring.append(_out(b"x"))
    assert ring.snapshot() == []
    assert ring.size == 0


def test_a_snapshot_is_a_copy() -> None:
    ring = Ring(100)
    ring.append(_out(b"a"))
    snap = ring.snapshot()
    ring.append(_out(b"b"))
    assert snap == [_out(b"a")]


# -- subscriber ------------------------------------------------------------------------------------


def test_events_come_out_in_order_and_pending_counts_payload_bytes() -> None:
    async def scenario() -> None:
        sub = Subscriber(100)
        sub.push(_out(b"one"))
        sub.push(Chunk(STDERR, b"two!"))
        assert sub.pending == 7
        assert await sub.get(1) == _out(b"one")
        assert sub.pending == 4
        assert await sub.get(1) == Chunk(STDERR, b"two!")
        assert sub.pending == 0

    _run(scenario)


def test_get_returns_none_after_silence_so_a_keepalive_can_be_sent() -> None:
    async def scenario() -> None:
        sub = Subscriber(100)
        assert await sub.get(0.01) is None
        sub.push(_out(b"late"))
        assert await sub.get(0.01) == _out(b"late")

    _run(scenario)


def test_a_waiting_get_wakes_on_push() -> None:
    async def scenario() -> None:
        sub = Subscriber(100)
        waiting = asyncio.create_task(sub.get(5))
        await asyncio.sleep(0)
        assert not waiting.done()
        sub.push(_out(b"x"))
        assert await waiting == _out(b"x")

    _run(scenario)


def test_a_subscriber_past_its_limit_overflows_and_gets_nothing_more() -> None:
    async def scenario() -> None:
        sub = Subscriber(10)
        sub.push(_out(b"123456"))
        sub.push(_out(b"7890"))  # exactly at the limit: still fine
        assert not sub.overflowed
        sub.push(_out(b"!"))
        assert sub.overflowed
        assert sub.pending == 0  # what was queued is dropped: the client reattaches and replays
        sub.push(_out(b"more"))
        sub.push(EXITED)  # even the exit: an overflowed stream ends with the overflow
        with pytest.raises(Overflow):
            await sub.get(1)
        with pytest.raises(Overflow):
            await sub.get(1)

    _run(scenario)


def test_overflow_wakes_a_waiting_get() -> None:
    async def scenario() -> None:
        sub = Subscriber(4)
        waiting = asyncio.create_task(sub.get(5))
        await asyncio.sleep(0)
        sub.push(_out(b"too long"))
        with pytest.raises(Overflow):
            await waiting

    _run(scenario)


def test_the_exit_is_delivered_beyond_any_limit_and_is_last() -> None:
    async def scenario() -> None:
        sub = Subscriber(4)
        sub.push(_out(b"1234"))
        sub.push(EXITED)  # the queue is full, the exit still goes in
        sub.push(_out(b"after"))  # nothing after the exit
        sub.push(Exited(exit_code=1, signal=0, timed_out=False, error="second", end_time=2.0))
        assert await sub.get(1) == _out(b"1234")
        assert await sub.get(1) == EXITED
        assert await sub.get(0.01) is None

    _run(scenario)


def test_a_pacer_never_overflows_and_asks_for_a_pause_above_its_limit() -> None:
    async def scenario() -> None:
        sub = Subscriber(10, pacer=True)
        sub.push(_out(b"0123456789"))
        assert not sub.above_high_water()  # at the limit, not above
        sub.push(_out(b"abcdef"))
        assert not sub.overflowed
        assert sub.above_high_water()
        assert sub.pending == 16

    _run(scenario)


def test_only_a_pacer_is_ever_above_high_water() -> None:
    sub = Subscriber(10)
    sub.push(_out(b"0123456789"))
    assert not sub.above_high_water()


def test_wait_drained_returns_once_the_queue_is_at_half_its_limit() -> None:
    async def scenario() -> None:
        sub = Subscriber(10, pacer=True)
        for _ in range(4):
            sub.push(_out(b"abcd"))  # 16 bytes queued
        drained = asyncio.create_task(sub.wait_drained())
        await asyncio.sleep(0)
        await sub.get(1)  # 12 left
        await sub.get(1)  # 8 left: still above 5
        await asyncio.sleep(0)
        assert not drained.done()
        await sub.get(1)  # 4 left: at most half the limit
        await asyncio.wait_for(drained, 1)
        assert sub.pending == 4

    _run(scenario)


def test_wait_drained_returns_at_once_when_already_drained() -> None:
    async def scenario() -> None:
        sub = Subscriber(10, pacer=True)
        sub.push(_out(b"12345"))
        await asyncio.wait_for(sub.wait_drained(), 1)

    _run(scenario)


def test_closing_a_subscriber_releases_a_paused_reader() -> None:
    async def scenario() -> None:
        sub = Subscriber(4, pacer=True)
        sub.push(_out(b"0123456789"))
        drained = asyncio.create_task(sub.wait_drained())
        await asyncio.sleep(0)
        assert not drained.done()
        sub.close()  # the consumer left: the process must not stay paused for it
        await asyncio.wait_for(drained, 1)
        assert sub.closed

    _run(scenario)


def test_interrupt_ends_the_subscription_with_the_error() -> None:
    async def scenario() -> None:
        sub = Subscriber(100)
        waiting = asyncio.create_task(sub.get(5))
        await asyncio.sleep(0)
        sub.interrupt(ValueError("bad client message"))
        with pytest.raises(ValueError, match="bad client message"):
            await waiting
        sub.push(_out(b"x"))
        with pytest.raises(ValueError):
            await sub.get(1)

    _run(scenario)


# -- collector -------------------------------------------------------------------------------------


def test_a_collector_keeps_stdout_and_stderr_apart_and_resolves_with_the_exit() -> None:
    async def scenario() -> None:
        collector = Collector(100)
        collector.push(_out(b"out1 "))
        collector.push(Chunk(STDERR, b"err"))
        collector.push(_out(b"out2"))
        assert not collector.finished.done()
        collector.push(EXITED)
        assert await collector.finished == EXITED
        assert bytes(collector.stdout) == b"out1 out2"
        assert bytes(collector.stderr) == b"err"
        assert collector.kept == 12
        assert not collector.truncated

    _run(scenario)


def test_a_collector_drops_what_exceeds_its_cap_across_both_streams() -> None:
    async def scenario() -> None:
        collector = Collector(6)
        collector.push(_out(b"1234"))
        collector.push(Chunk(STDERR, b"abcd"))  # only 2 bytes of room left
        collector.push(_out(b"zz"))  # no room at all
        assert bytes(collector.stdout) == b"1234"
        assert bytes(collector.stderr) == b"ab"
        assert collector.kept == 6
        assert collector.truncated
        # It never slows the process down and never overflows, whatever it was given.
        assert not collector.above_high_water()
        assert not collector.overflowed
        collector.push(EXITED)
        assert await collector.finished == EXITED

    _run(scenario)


def test_an_exit_after_the_caller_gave_up_is_ignored() -> None:
    async def scenario() -> None:
        collector = Collector(10)
        collector.finished.cancel()  # the RunProcess call was cancelled
        collector.push(EXITED)  # must not raise InvalidStateError
        assert collector.finished.cancelled()

    _run(scenario)


# -- a terminal's readers --------------------------------------------------------------------------

PACING = TerminalPacing(window_bytes=10, wait_seconds=2.0, stall_seconds=30.0, behind_bytes=100)


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _reader(clock: Clock) -> Subscriber:
    return Subscriber(PACING.window_bytes, pacer=True, clock=clock)


def test_idle_counts_from_the_first_waiting_chunk_and_restarts_at_every_take() -> None:
    async def scenario() -> None:
        clock = Clock()
        sub = _reader(clock)
        clock.now += 50  # nothing waited meanwhile: an idle terminal makes nobody idle
        assert sub.idle(clock.now) == 0.0
        sub.push(_out(b"ab"))
        clock.now += 3
        sub.push(_out(b"cd"))
        assert sub.idle(clock.now) == 3.0
        await sub.get(1)
        assert sub.idle(clock.now) == 0.0  # it took something: the clock restarts, output still waits
        clock.now += 1
        assert sub.idle(clock.now) == 1.0
        await sub.get(1)
        clock.now += 10
        assert sub.idle(clock.now) == 0.0  # nothing waits any more

    _run(scenario)


def test_the_terminal_waits_for_a_reader_that_is_reading_but_behind() -> None:
    async def scenario() -> None:
        clock = Clock()
        fast, slow = _reader(clock), _reader(clock)
        for sub in (fast, slow):
            sub.push(_out(b"x" * 11))  # one byte over the window
        await fast.get(1)
        pace = pace_terminal([fast, slow], PACING, clock.now)
        assert pace.blocking is slow and pace.detach == []
        assert pace.recheck_in == 2.0  # when `slow` would stop counting as reading
        clock.now += 1.5
        assert pace_terminal([fast, slow], PACING, clock.now).recheck_in == 0.5

    _run(scenario)


def test_a_reader_within_its_window_holds_nobody() -> None:
    clock = Clock()
    sub = _reader(clock)
    sub.push(_out(b"x" * 10))
    assert pace_terminal([sub], PACING, clock.now).blocking is None


def test_a_reader_that_stopped_no_longer_holds_the_others_and_is_detached_after_the_stall_bound() -> None:
    async def scenario() -> None:
        clock = Clock()
        reading, stalled = _reader(clock), _reader(clock)
        for sub in (reading, stalled):
            sub.push(_out(b"x" * 11))
        clock.now += 2.0
        await reading.get(1)  # `reading` took; `stalled` has taken nothing for 2 s
        pace = pace_terminal([reading, stalled], PACING, clock.now)
        assert pace.blocking is None and pace.detach == []
        assert pace.recheck_in == 28.0  # when `stalled` reaches the stall bound
        clock.now += 28.0
        reading.push(_out(b"y"))
        await reading.get(1)
        pace = pace_terminal([reading, stalled], PACING, clock.now)
        assert [sub for sub, _ in pace.detach] == [stalled]
        assert "read nothing for 30 s" in pace.detach[0][1] and "attach again" in pace.detach[0][1]

    _run(scenario)


def test_a_reader_too_far_behind_the_others_is_detached_before_the_stall_bound() -> None:
    async def scenario() -> None:
        clock = Clock()
        reading, stalled = _reader(clock), _reader(clock)
        stalled.push(_out(b"x" * 60))
        clock.now += 3.0
        stalled.push(_out(b"x" * 60))  # 120 bytes behind, more than behind_bytes
        reading.push(_out(b"x" * 60))
        await reading.get(1)
        (detached,) = pace_terminal([reading, stalled], PACING, clock.now).detach
        assert detached[0] is stalled and "more than 100 bytes behind" in detached[1]

    _run(scenario)


def test_when_nobody_reads_the_terminal_waits_and_nobody_is_detached() -> None:
    clock = Clock()
    only = _reader(clock)
    only.push(_out(b"x" * 50))
    clock.now += 3600  # an hour without a take: still attached, the program just blocks
    pace = pace_terminal([only], PACING, clock.now)
    assert pace.blocking is only and pace.detach == [] and pace.recheck_in is None
    other = _reader(clock)
    other.push(_out(b"x" * 50))
    clock.now += 10
    pace = pace_terminal([only, other], PACING, clock.now)
    assert pace.blocking is only and pace.detach == []


def test_a_reader_that_comes_back_holds_the_terminal_again_until_it_caught_up() -> None:
    async def scenario() -> None:
        clock = Clock()
        reading, away = _reader(clock), _reader(clock)
        away.push(_out(b"x" * 40))
        clock.now += 5
        assert pace_terminal([reading, away], PACING, clock.now).blocking is None
        away.push(_out(b"x" * 40))
        await away.get(1)  # back: 40 bytes still waiting, beyond its window
        assert pace_terminal([reading, away], PACING, clock.now).blocking is away

    _run(scenario)


def test_a_detached_reader_gets_the_error_at_once_and_nothing_more() -> None:
    async def scenario() -> None:
        sub = _reader(Clock())
        sub.push(_out(b"x" * 11))
        waiter = asyncio.ensure_future(sub.wait_drained())
        await asyncio.sleep(0)
        sub.detach(RuntimeError("detached: gone"))
        await asyncio.wait_for(waiter, 1)  # a terminal paused on it resumes
        assert sub.pending == 0 and sub.idle(1e9) == 0.0
        sub.push(_out(b"late"))
        sub.push(EXITED)
        assert sub.pending == 0
        with pytest.raises(RuntimeError, match="detached: gone"):
            await sub.get(1)

    _run(scenario)
