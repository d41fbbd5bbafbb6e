"""The metering arithmetic (billing_svc/usage.py): intervals from transitions, the rounding rule. Pure."""

from __future__ import annotations

import random

import pytest

from billing_svc import usage
from billing_svc.usage import Interval, Transition
from cyberdesk_common.lifecycle_events import InstanceState as S

US = usage.US
T0 = 1_764_547_200 * US  # 2025-12-01T00:00:00Z, a whole second


def _t(at_us: int, state: S, n: int = 0, desktop: bool = False) -> Transition:
    return Transition(at_us, f"{at_us // 1000}-{n}", state, 2, 1024, 2048, desktop)


@pytest.mark.parametrize(
    ("start", "end", "billed"),
    [
        (T0, T0 + 10 * US, 10),
        (T0 + 400_000, T0 + 10 * US + 300_000, 10),  # 9.9 s crossing 10 whole-second marks
        (T0 + 900_000, T0 + 1_100_000, 1),  # 0.2 s across a mark
        (T0 + 100_000, T0 + 800_000, 0),  # 0.7 s inside one second
        (T0 + 5 * US, T0 + 5 * US, 0),
        (T0 + 6 * US, T0 + 5 * US, 0),  # reversed: nothing, never negative
    ],
)
def test_rounding_rule(start: int, end: int, billed: int) -> None:
    assert usage.seconds(start, end) == billed


def test_rounding_is_additive_under_whole_second_splits_and_within_a_second_of_exact() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        a = T0 + rng.randrange(0, 10**9)
        b = a + rng.randrange(0, 10**9)
        cut = (a + rng.randrange(0, b - a + 1)) // US * US
        if not a <= cut <= b:
            cut = a // US * US + US if a // US * US + US <= b else b
        whole = usage.seconds(a, b)
        if a <= cut <= b and cut % US == 0:
            assert usage.seconds(a, cut) + usage.seconds(cut, b) == whole
        assert abs(whole - (b - a) / US) < 1


def test_intervals_running_paused_running_then_deleted() -> None:
    events = [
        _t(T0, S.PENDING),
        _t(T0 + 100_000, S.STARTING),
        _t(T0 + 350_000, S.RUNNING),
        _t(T0 + 10 * US + 350_000, S.PAUSED),
        _t(T0 + 15 * US + 350_000, S.RUNNING),
        _t(T0 + 20 * US + 350_000, S.STOPPING),
        _t(T0 + 20 * US + 500_000, S.TERMINATED),
    ]
    got = usage.intervals(events)
    assert [(i.state, i.start_us, i.end_us) for i in got] == [
        (S.RUNNING, T0 + 350_000, T0 + 10 * US + 350_000),
        (S.PAUSED, T0 + 10 * US + 350_000, T0 + 15 * US + 350_000),
        (S.RUNNING, T0 + 15 * US + 350_000, T0 + 20 * US + 350_000),
    ]
    totals = usage.totals(got, 0, 2**62, T0 + 100 * US)
    assert totals.instance_seconds == 15
    assert totals.vcpu_seconds == 30
    assert totals.memory_mib_seconds == 15 * 1024
    assert totals.paused_seconds == 5
    assert totals.disk_mib_seconds == 20 * 2048  # disk in RUNNING and PAUSED
    assert totals.paused_disk_mib_seconds == 5 * 2048
    assert totals.desktop_seconds == 0


def test_order_of_arrival_does_not_matter() -> None:
    events = [
        _t(T0 + 1 * US, S.RUNNING),
        _t(T0 + 4 * US, S.PAUSED),
        _t(T0 + 6 * US, S.RUNNING),
        _t(T0 + 9 * US, S.STOPPING),
        _t(T0 + 9 * US + 1, S.TERMINATED),
    ]
    expected = usage.intervals(events)
    rng = random.Random(1)
    for _ in range(20):
        shuffled = events[:]
        rng.shuffle(shuffled)
        assert usage.intervals(shuffled) == expected


def test_an_open_interval_counts_up_to_now_and_nothing_after_a_terminal_state() -> None:
    running = usage.intervals([_t(T0, S.RUNNING, desktop=True)])
    assert running == [Interval(S.RUNNING, T0, None, 2, 1024, 2048, True)]
    assert usage.totals(running, 0, 2**62, T0 + 7 * US + 1).desktop_seconds == 7
    # A (malformed) event after FAILED opens nothing.
    assert usage.intervals([_t(T0, S.RUNNING), _t(T0 + US, S.FAILED), _t(T0 + 2 * US, S.RUNNING)]) == [
        Interval(S.RUNNING, T0, T0 + US, 2, 1024, 2048, False)
    ]


def test_period_clipping_and_windows_sum_to_the_total() -> None:
    ivs = usage.intervals([_t(T0 + 250_000, S.RUNNING), _t(T0 + 125 * US + 900_000, S.TERMINATED)])
    total = usage.totals(ivs, 0, 2**62, 0).vcpu_seconds
    windows = sum(usage.totals(ivs, T0 + w * US, T0 + (w + 60) * US, 0).vcpu_seconds for w in range(0, 180, 60))
    assert windows == total == 125 * 2


def test_month_start_and_identifier() -> None:
    assert usage.month_start_us(T0 + 3 * 86400 * US + 5) == T0
    assert usage.month_start_us(T0 - 1) == 1_761_955_200 * US  # 2025-11-01
    ident = usage.identifier("i-7f3a9c2e1b4d", "memory_mib_seconds", 1764547200)
    assert ident == "cd1:i-7f3a9c2e1b4d:memory_mib_seconds:1764547200"
    assert len(ident) <= 100
