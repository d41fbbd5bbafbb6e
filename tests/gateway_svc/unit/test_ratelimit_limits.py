"""Parsing rate-limit specifications ("100/1s") (gateway_svc/ratelimit.py), in-process."""

from __future__ import annotations

import pytest

from gateway_svc.ratelimit import Limit, parse_limit


def test_parse_limit() -> None:
    assert parse_limit("100/1s") == Limit(100, 1.0)
    assert parse_limit("6000/m") == Limit(6000, 60.0)
    assert parse_limit("10 / 500ms") == Limit(10, 0.5)
    for bad in ("100", "0/1s", "5/0s", "ten/1s", "5/1d"):
        with pytest.raises(ValueError, match=r"rate limit|positive"):
            parse_limit(bad)
