"""The inotify record decoder of WatchDirectory, on bytes built by hand (no watch, no agent)."""

from __future__ import annotations

import struct

from guest_agent.watch import IN_CREATE, IN_ISDIR, IN_MOVED_FROM, RawEvent, parse_events


def test_parse_events_decodes_padded_names() -> None:
    raw = struct.pack("iIII", 1, IN_CREATE | IN_ISDIR, 0, 16) + b"dir\0" + b"\0" * 12
    raw += struct.pack("iIII", 2, IN_MOVED_FROM, 7, 8) + "é.txt".encode() + b"\0\0"
    assert parse_events(raw) == [RawEvent(1, IN_CREATE | IN_ISDIR, 0, "dir"), RawEvent(2, IN_MOVED_FROM, 7, "é.txt")]
