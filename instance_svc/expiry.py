"""Deadline arithmetic, as pure functions of the clock value passed in.

Times are integer microseconds since the epoch: exact to store, compare and put in page tokens.
"""

from __future__ import annotations

import enum

US = 1_000_000
MIN_TIMEOUT_US = 1 * US
MAX_TIMEOUT_US = 24 * 3600 * US
DEFAULT_TIMEOUT_US = 300 * US


class TimeoutAction(enum.Enum):
    """What happens at the deadline; values are the `cyberdesk.v1.TimeoutAction` numbers."""

    TERMINATE = 1
    PAUSE = 2


def check_timeout(timeout_us: int, field: str = "timeout") -> str | None:
    """None when `timeout_us` is an allowed lifetime, else a message naming `field`."""
    if timeout_us < MIN_TIMEOUT_US or timeout_us > MAX_TIMEOUT_US:
        return f"{field} must be between 1s and 24h (86400s), got {timeout_us / US:g}s"
    return None


def deadline(now_us: int, timeout_us: int) -> int:
    """The deadline of an instance given `timeout_us` of lifetime from `now_us`."""
    return now_us + timeout_us


def delay_seconds(deadline_us: int, now_us: int) -> float:
    """Seconds to wait before `deadline_us` fires; 0 when it has passed (fire at once)."""
    return max(0.0, (deadline_us - now_us) / US)


def effective_action(action: TimeoutAction, supports_pause: bool) -> TimeoutAction:
    """Pause only where the runtime can; otherwise the deadline terminates."""
    if action is TimeoutAction.PAUSE and not supports_pause:
        return TimeoutAction.TERMINATE
    return action


def resume_deadline(deadline_us: int, now_us: int, timeout_us: int) -> int:
    """The deadline of a resumed instance: kept when still ahead, else a fresh `timeout_us` from now.

    An instance paused by its deadline would otherwise pause again the moment it is resumed.
    """
    return deadline_us if deadline_us > now_us else now_us + timeout_us
