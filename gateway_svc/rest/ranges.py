"""Range planning for file downloads (pure): which bytes to ask the agent for, and what to answer.

Served forms (RFC 9110 section 14), one range only:

- `bytes=a-b`: bytes a..b inclusive; an end past the file is clipped to the last byte;
- `bytes=a-`: from a to the end;
- `bytes=-n`: the last n bytes (a suffix: the size must be known first).

A range that starts at or past the end of the file, `bytes=-0`, or any suffix of an empty file is
not satisfiable: 416 with `Content-Range: bytes */<size>`. A Range header of any other form
(several ranges, `bytes=5-1`, another unit, garbage) is ignored and the whole file is sent, as
RFC 9110 allows a server to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc

from gateway_svc.rest import http_errors

_BYTES_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")


@dataclass(frozen=True)
class ByteRange:
    """One `bytes=` range as the client wrote it.

    `first` None is a suffix range of the last `last` bytes; `last` None runs to the end of the file.
    """

    first: int | None
    last: int | None

    @property
    def is_suffix(self) -> bool:
        """Whether the range counts from the end, so the file's size is needed to plan it."""
        return self.first is None


@dataclass(frozen=True)
class Window:
    """What to ask DownloadFile for: `offset`, and `length` bytes (0: to the end of the file)."""

    offset: int
    length: int


@dataclass(frozen=True)
class ResponsePlan:
    """The status and the length headers of a download answer, once the file's size is known."""

    status: int  # 200 (whole file) or 206 (a range)
    content_length: int
    content_range: str | None  # `bytes a-b/size` for a 206

    def headers(self) -> dict[str, str]:
        """The response headers the plan decides (Accept-Ranges is always sent)."""
        out = {"accept-ranges": "bytes", "content-length": str(self.content_length)}
        if self.content_range is not None:
            out["content-range"] = self.content_range
        return out


class RangeNotSatisfiable(Exception):
    """The range asks for no byte of the file: the answer is 416 with the file's size."""

    def __init__(self, total: int) -> None:
        super().__init__(f"the range is not satisfiable: the file has {total} bytes")
        self.total = total

    def http_error(self) -> http_errors.HttpError:
        """416, `Content-Range: bytes */<size>`, and an OUT_OF_RANGE Status body."""
        err = http_errors.from_status(grpc.StatusCode.OUT_OF_RANGE, str(self))
        return http_errors.HttpError(416, err.body, {"Content-Range": f"bytes */{self.total}"})


def parse_range(header: str) -> ByteRange | None:
    """The single `bytes=` range of a Range header value; None when the header is to be ignored.

    An end before the start is not a valid range (ignored, like any malformed Range).
    """
    m = _BYTES_RANGE.match(header.strip().replace(" ", ""))
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:
        return ByteRange(None, int(last))
    start = int(first)
    end = int(last) if last else None
    if end is not None and end < start:
        return None
    return ByteRange(start, end)


def request_window(wanted: ByteRange, total: int | None = None) -> Window:
    """The DownloadFile window for a range; a suffix range needs the file's size `total`.

    RangeNotSatisfiable for `bytes=-0` and for any suffix of an empty file.
    """
    if wanted.first is None:
        if total is None:
            raise ValueError("a suffix range needs the size of the file")
        if wanted.last is None or wanted.last == 0 or total == 0:
            raise RangeNotSatisfiable(total)
        start, end = max(0, total - wanted.last), total - 1
        return Window(start, end - start + 1)
    return Window(wanted.first, 0 if wanted.last is None else wanted.last - wanted.first + 1)


def plan_response(window: Window, total: int, ranged: bool) -> ResponsePlan:
    """Status, Content-Length and Content-Range for `window` of a file of `total` bytes.

    Without a Range header (`ranged` False) the window is what the query asked for and the status
    is 200 whatever it covers; with one, a window starting at or past the end is not satisfiable.
    """
    end_excl = total if window.length == 0 else min(total, window.offset + window.length)
    if ranged and window.offset >= total:
        raise RangeNotSatisfiable(total)
    length = max(0, end_excl - window.offset)
    if not ranged:
        return ResponsePlan(200, length, None)
    return ResponsePlan(206, length, f"bytes {window.offset}-{end_excl - 1}/{total}")
