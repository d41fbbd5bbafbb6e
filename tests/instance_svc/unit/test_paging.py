"""Opaque page tokens and page sizes (instance_svc/paging.py)."""

from __future__ import annotations

import pytest

from instance_svc import paging


def test_page_tokens_round_trip_and_reject_garbage() -> None:
    cursor = paging.Cursor(1_700_000_000_123_456, "i-abc")
    token = paging.encode(cursor, "i")
    assert paging.decode(token, "i") == cursor
    assert paging.decode("", "i") is None
    for bad in ("garbage", "x" * 7, paging.encode(cursor, "s"), "e30"):  # e30 = "{}"
        with pytest.raises(paging.BadPageRequest, match="page_token"):
            paging.decode(bad, "i")
    assert paging.page_size(0) == 50
    assert paging.page_size(5000) == 1000
    with pytest.raises(paging.BadPageRequest, match="page_size"):
        paging.page_size(-1)
