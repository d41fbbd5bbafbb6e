"""Deadline arithmetic (instance_svc/expiry.py): deadlines, delays, the effective action, resume."""

from __future__ import annotations

import pytest

from instance_svc import expiry
from instance_svc.expiry import US, TimeoutAction


def test_expiry_arithmetic() -> None:
    assert expiry.deadline(10 * US, 5 * US) == 15 * US
    assert expiry.delay_seconds(15 * US, 10 * US) == 5.0
    assert expiry.delay_seconds(10 * US, 15 * US) == 0.0  # passed: fire at once
    assert expiry.effective_action(TimeoutAction.PAUSE, supports_pause=False) is TimeoutAction.TERMINATE
    assert expiry.effective_action(TimeoutAction.PAUSE, supports_pause=True) is TimeoutAction.PAUSE
    assert expiry.effective_action(TimeoutAction.TERMINATE, supports_pause=True) is TimeoutAction.TERMINATE
    assert expiry.resume_deadline(20 * US, 10 * US, 7 * US) == 20 * US
    assert expiry.resume_deadline(5 * US, 10 * US, 7 * US) == 17 * US


@pytest.mark.parametrize(
    ("timeout_us", "ok"), [(US - 1, False), (US, True), (86400 * US, True), (86400 * US + 1, False)]
)
def test_timeout_bounds(timeout_us: int, ok: bool) -> None:
    problem = expiry.check_timeout(timeout_us)
    assert (problem is None) == ok
    if not ok:
        assert problem is not None and "timeout must be between 1s and 24h" in problem
