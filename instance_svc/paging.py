"""Opaque page tokens: the (create_time, id) of the last item of a page, newest first."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


class BadPageRequest(ValueError):
    """page_size or page_token is unusable; the message names the field."""


@dataclass(frozen=True)
class Cursor:
    """Position after which the next page starts (exclusive), in newest-first order."""

    create_time_us: int
    item_id: str


def encode(cursor: Cursor, kind: str) -> str:
    """A URL-safe token for `cursor`; `kind` keeps instance and snapshot tokens apart."""
    raw = json.dumps([kind, cursor.create_time_us, cursor.item_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, kind: str) -> Cursor | None:
    """The cursor in `token` (None for the first page); BadPageRequest when it is not ours."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw)
        got_kind, create_time_us, item_id = value
        if got_kind != kind or not isinstance(create_time_us, int) or not isinstance(item_id, str):
            raise ValueError(kind)
    except (ValueError, TypeError):
        raise BadPageRequest(
            "page_token is not a token returned by this list call; pass next_page_token unchanged or leave it empty"
        ) from None
    return Cursor(create_time_us, item_id)


def page_size(requested: int) -> int:
    """The effective page size: default 50, at most 1000."""
    if requested < 0:
        raise BadPageRequest(f"page_size must not be negative, got {requested}")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)
