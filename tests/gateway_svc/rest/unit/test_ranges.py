"""Range planning of file downloads: which header forms are served, the window asked of the agent, 206/416."""

from __future__ import annotations

import json

import pytest

from gateway_svc.rest.ranges import (
    ByteRange,
    RangeNotSatisfiable,
    ResponsePlan,
    Window,
    parse_range,
    plan_response,
    request_window,
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", ByteRange(0, 99)),
        ("bytes=5-5", ByteRange(5, 5)),
        ("bytes=100-", ByteRange(100, None)),
        ("bytes=-10", ByteRange(None, 10)),
        ("bytes=-0", ByteRange(None, 0)),
        ("  bytes = 1 - 2 ", ByteRange(1, 2)),  # spaces anywhere are dropped
    ],
)
def test_single_range_forms(header: str, expected: ByteRange) -> None:
    assert parse_range(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        "",  # no Range header
        "bytes=0-1,5-6",  # several ranges: the whole file instead (RFC 9110 allows it)
        "bytes=-5,10-",
        "bytes=5-1",  # an end before the start is no valid range
        "bytes=-",
        "bytes=",
        "items=0-1",  # another unit
        "bytes=a-b",
        "bytes 0-1",
        "0-1",
    ],
)
def test_other_forms_are_ignored(header: str) -> None:
    assert parse_range(header) is None


def test_suffix_is_told_apart() -> None:
    assert ByteRange(None, 10).is_suffix and not ByteRange(0, 10).is_suffix and not ByteRange(3, None).is_suffix


@pytest.mark.parametrize(
    ("wanted", "total", "window"),
    [
        (ByteRange(0, 99), None, Window(0, 100)),
        (ByteRange(10, 10), None, Window(10, 1)),
        (ByteRange(100, None), None, Window(100, 0)),  # length 0: to the end
        (ByteRange(None, 10), 100, Window(90, 10)),  # the last 10 bytes
        (ByteRange(None, 500), 100, Window(0, 100)),  # a suffix longer than the file is the whole file
        (ByteRange(None, 1), 1, Window(0, 1)),
    ],
)
def test_window_asked_of_the_agent(wanted: ByteRange, total: int | None, window: Window) -> None:
    assert request_window(wanted, total) == window


@pytest.mark.parametrize(("wanted", "total"), [(ByteRange(None, 0), 100), (ByteRange(None, 5), 0)])
def test_unsatisfiable_suffixes(wanted: ByteRange, total: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as caught:
        request_window(wanted, total)
    assert caught.value.total == total


def test_a_suffix_needs_the_size() -> None:
    with pytest.raises(ValueError, match="size"):
        request_window(ByteRange(None, 5))


@pytest.mark.parametrize(
    ("window", "total", "plan"),
    [
        (Window(0, 100), 1000, ResponsePlan(206, 100, "bytes 0-99/1000")),
        (Window(990, 100), 1000, ResponsePlan(206, 10, "bytes 990-999/1000")),  # an end past the file is clipped
        (Window(500, 0), 1000, ResponsePlan(206, 500, "bytes 500-999/1000")),
        (Window(999, 0), 1000, ResponsePlan(206, 1, "bytes 999-999/1000")),
    ],
)
def test_ranged_answers_are_206(window: Window, total: int, plan: ResponsePlan) -> None:
    assert plan_response(window, total, ranged=True) == plan


@pytest.mark.parametrize(("window", "total"), [(Window(1000, 0), 1000), (Window(2000, 5), 1000), (Window(0, 0), 0)])
def test_a_range_starting_at_or_past_the_end_is_unsatisfiable(window: Window, total: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as caught:
        plan_response(window, total, ranged=True)
    err = caught.value.http_error()
    assert err.status == 416 and err.headers == {"Content-Range": f"bytes */{total}"}
    assert err.body["code"] == 11  # OUT_OF_RANGE
    assert err.body["message"] == f"the range is not satisfiable: the file has {total} bytes"
    assert json.loads(err.body_bytes())["code"] == 11


@pytest.mark.parametrize(
    ("window", "total", "length"),
    [(Window(0, 0), 1000, 1000), (Window(0, 0), 0, 0), (Window(10, 5), 1000, 5), (Window(2000, 0), 1000, 0)],
)
def test_without_a_range_header_the_answer_is_200(window: Window, total: int, length: int) -> None:
    # The window then comes from the query (offset/length) and is never refused.
    plan = plan_response(window, total, ranged=False)
    assert plan == ResponsePlan(200, length, None)
    assert plan.headers() == {"accept-ranges": "bytes", "content-length": str(length)}


def test_headers_of_a_206() -> None:
    assert plan_response(Window(2, 3), 10, ranged=True).headers() == {
        "accept-ranges": "bytes",
        "content-length": "3",
        "content-range": "bytes 2-4/10",
    }


def test_header_to_plan_end_to_end() -> None:
    # The download handler's sequence: parse, window (with the size for a suffix), plan once the size is known.
    wanted = parse_range("bytes=-4")
    assert wanted is not None
    window = request_window(wanted, 10)
    assert plan_response(window, 10, ranged=True) == ResponsePlan(206, 4, "bytes 6-9/10")
