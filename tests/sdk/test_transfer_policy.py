"""The pure parts of resumable transfers (cyberdesk/_local.py): when to try again, and reading at a cursor."""

from __future__ import annotations

import io
import threading

from cyberdesk._local import Backoff, Cursor, new_upload_id, seekable


def test_backoff_doubles_to_a_cap_and_gives_up_after_its_attempts_in_a_row() -> None:
    backoff = Backoff(attempts=5, first=0.25, cap=1.0)
    assert [backoff.next_delay(progressed=False) for _ in range(6)] == [0.25, 0.5, 1.0, 1.0, 1.0, None]


def test_progress_starts_the_count_again() -> None:
    backoff = Backoff(attempts=2, first=0.1, cap=10)
    assert backoff.next_delay(False) == 0.1 and backoff.next_delay(False) == 0.2
    assert backoff.next_delay(progressed=True) == 0.1  # bytes moved forward since the last failure
    backoff.next_delay(False)
    backoff.reset()
    assert backoff.next_delay(False) == 0.1


def test_cursors_on_one_stream_keep_their_own_positions() -> None:
    stream = io.BytesIO(bytes(range(100)))
    lock = threading.Lock()
    old, new = Cursor(stream, 10, lock), Cursor(stream, 50, lock)
    assert old.read(5) == bytes(range(10, 15))
    assert new.read(3) == bytes(range(50, 53))
    # The abandoned try finishing a read does not move the new one.
    assert old.read(2) == bytes(range(15, 17))
    assert new.read(2) == bytes(range(53, 55)) and new.position == 55
    assert Cursor(stream, 98, lock).read(10) == bytes([98, 99])


def test_upload_ids_and_seekable_sources() -> None:
    ids = {new_upload_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 24 and i.isalnum() for i in ids)
    assert seekable(io.BytesIO(b"x"))
    read_end, write_end = __import__("os").pipe()
    with open(read_end, "rb") as pipe, open(write_end, "wb"):
        assert not seekable(pipe)
