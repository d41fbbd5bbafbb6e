"""Polling with a deadline: how tests wait for something real processes do (never a bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = 30.0, every: float = 0.05) -> T:
    """Poll `probe` until it returns something truthy and return that; fail naming `what` after `timeout` s.

    Timeouts are generous on purpose: the suite must pass on a loaded machine, and a passing poll
    returns as soon as the condition holds.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s (last: {last!r})")
        time.sleep(every)
