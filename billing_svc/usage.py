"""Metering arithmetic (pure): lifecycle transitions into billed intervals, intervals into usage.

The rounding rule (docs/billing.md): an interval from `a` to `b` (microseconds since the epoch)
is billed `b // 1 s - a // 1 s` whole seconds, the whole-second marks of the clock it crosses.
It is additive under any split at a whole second (periods, Stripe windows, months) and between
consecutive intervals of one instance (they share their boundary), so nothing is counted twice
or dropped, and an instance's total is within one second of its exact duration.

Intervals are derived from an instance's transitions sorted by event time, never from the order
events arrived in: a reclaimed pending entry or a second consumer may deliver them out of order,
and the same set of transitions must always give the same intervals.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cyberdesk_common.lifecycle_events import InstanceState

US = 1_000_000

# The billed states and what each is billed as: RUNNING is compute (and disk), PAUSED is disk only.
BILLED_STATES = (InstanceState.RUNNING, InstanceState.PAUSED)

# Stripe meter names (docs/billing.md, "Stripe"): the per-window values the outbox sends.
METERS = ("instance_seconds", "vcpu_seconds", "memory_mib_seconds", "desktop_seconds", "disk_mib_seconds")


def seconds(start_us: int, end_us: int) -> int:
    """Whole seconds billed for [start_us, end_us): the whole-second marks crossed (0 when empty)."""
    if end_us <= start_us:
        return 0
    return end_us // US - start_us // US


def month_start_us(now_us: int) -> int:
    """The first microsecond of the calendar month (UTC) that `now_us` falls in."""
    now = datetime.fromtimestamp(now_us / US, tz=UTC)
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    return int(start.timestamp()) * US


@dataclass(frozen=True)
class Transition:
    """One applied lifecycle event of an instance, as the ledger keeps it."""

    time_us: int
    stream_id: str  # tie-break for equal times: the order instance_svc published in
    new_state: InstanceState
    vcpus: int
    memory_mib: int
    disk_mib: int
    desktop: bool


@dataclass(frozen=True)
class Interval:
    """A stretch of one billed state of one instance; `end_us` None while it is still open."""

    state: InstanceState
    start_us: int
    end_us: int | None
    vcpus: int
    memory_mib: int
    disk_mib: int
    desktop: bool


def stream_order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return (int(ms) if ms.isdigit() else 0, int(seq) if seq.isdigit() else 0)


def intervals(transitions: Iterable[Transition], presorted: bool = False) -> list[Interval]:
    """The billed intervals of one instance from all of its transitions, in any order.

    Each transition into RUNNING or PAUSED opens an interval that the next transition (by time)
    closes; the last one stays open unless a later transition ended it. Nothing is billed after a
    terminal state even if a (malformed) later event says otherwise. `presorted`: the caller
    sorted them by (time, stream id) already.
    """
    ordered = (
        list(transitions) if presorted else sorted(transitions, key=lambda t: (t.time_us, stream_order(t.stream_id)))
    )
    result: list[Interval] = []
    for i, current in enumerate(ordered):
        if current.new_state.terminal:
            break
        if current.new_state not in BILLED_STATES:
            continue
        nxt = ordered[i + 1].time_us if i + 1 < len(ordered) else None
        if nxt is not None and nxt <= current.time_us:
            continue  # an empty stretch
        result.append(
            Interval(
                current.new_state,
                current.time_us,
                nxt,
                current.vcpus,
                current.memory_mib,
                current.disk_mib,
                current.desktop,
            )
        )
    return result


@dataclass
class Totals:
    """Metered quantities (the `cyberdesk.v1.Usage` message's integers)."""

    instance_seconds: int = 0
    vcpu_seconds: int = 0
    memory_mib_seconds: int = 0
    desktop_seconds: int = 0
    paused_seconds: int = 0
    disk_mib_seconds: int = 0
    paused_disk_mib_seconds: int = 0

    def add(self, state: InstanceState, secs: int, vcpus: int, memory_mib: int, disk_mib: int, desktop: bool) -> None:
        """Count `secs` seconds of `state` of an instance of these resources."""
        if secs <= 0:
            return
        if state is InstanceState.RUNNING:
            self.instance_seconds += secs
            self.vcpu_seconds += secs * vcpus
            self.memory_mib_seconds += secs * memory_mib
            if desktop:
                self.desktop_seconds += secs
            self.disk_mib_seconds += secs * disk_mib
        elif state is InstanceState.PAUSED:
            self.paused_seconds += secs
            self.disk_mib_seconds += secs * disk_mib
            self.paused_disk_mib_seconds += secs * disk_mib

    def merge(self, other: Totals) -> None:
        """Add another set of totals to this one."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def meter(self, name: str) -> int:
        """The value of one Stripe meter (see METERS)."""
        if name not in METERS:
            raise KeyError(name)
        value: int = getattr(self, name)
        return value


def clipped_seconds(interval: Interval, start_us: int, end_us: int, as_of_us: int) -> int:
    """Seconds of `interval` inside [start_us, end_us); an open interval runs up to `as_of_us`."""
    stop = interval.end_us if interval.end_us is not None else as_of_us
    return seconds(max(interval.start_us, start_us), min(stop, end_us))


def totals(items: Sequence[Interval], start_us: int, end_us: int, as_of_us: int) -> Totals:
    """What `items` used in [start_us, end_us), open intervals counted up to `as_of_us`."""
    result = Totals()
    for item in items:
        secs = clipped_seconds(item, start_us, end_us, as_of_us)
        result.add(item.state, secs, item.vcpus, item.memory_mib, item.disk_mib, item.desktop)
    return result


@dataclass(frozen=True)
class WindowValue:
    """One (instance, meter, window) value, as the Stripe outbox sends it."""

    tenant: str
    instance_id: str
    meter: str
    window_start_s: int
    value: int
    identifier: str = field(default="")


def identifier(instance_id: str, meter: str, window_start_s: int) -> str:
    """The deterministic Stripe identifier of an (instance, meter, window) (docs/billing.md)."""
    return f"cd1:{instance_id}:{meter}:{window_start_s}"


def floor_to_second(time_us: int) -> int:
    """`time_us` truncated to a whole second (periods are whole seconds)."""
    return time_us - time_us % US
