"""`cyberdesk usage --since` parsing and its bad input (cyberdesk/cli/_main.py), in-process, no stack."""

from __future__ import annotations

import datetime as dt

import pytest

from cyberdesk.cli._main import UsageError, main, parse_since

NOW = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", NOW - dt.timedelta(seconds=90)),
        ("30m", NOW - dt.timedelta(minutes=30)),
        ("2h", NOW - dt.timedelta(hours=2)),
        ("7d", NOW - dt.timedelta(days=7)),
        ("2026-11-01", dt.datetime(2026, 11, 1, tzinfo=dt.UTC)),  # a date: UTC midnight
        ("2026-11-01T10:00:00+02:00", dt.datetime(2026, 11, 1, 8, tzinfo=dt.UTC)),
    ],
)
def test_since(text: str, expected: dt.datetime) -> None:
    assert parse_since(text, NOW) == expected


def test_a_bad_since_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError):
        parse_since("yesterday", NOW)
    assert main(["usage", "--since", "yesterday"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--since 'yesterday' is not a date" in err
