"""Folding process events into a result (pure, no server)."""

from __future__ import annotations

import pytest


def test_a_stream_without_an_exit_is_an_error_not_a_code() -> None:
    from cyberdesk import Unavailable
    from cyberdesk._models import Exited, ResultCollector, Started, Stdout

    collector = ResultCollector()
    collector.add(Started(7))
    collector.add(Stdout(b"partial"))
    with pytest.raises(Unavailable, match="process 7 ended before"):
        collector.result()
    collector.add(Exited(0))
    assert collector.result().stdout == b"partial"
