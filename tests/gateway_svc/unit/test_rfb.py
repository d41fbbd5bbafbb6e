"""gateway_svc.rfb: the client half of RFB, split into messages, view-only input dropped, violations refused."""

from __future__ import annotations

import struct

import pytest

from gateway_svc.rfb import MAX_CUT_TEXT, ClientStream, RfbViolation

HANDSHAKE = b"RFB 003.008\n" + b"\x01" + b"\x00"  # version, security None, ClientInit (exclusive)
PIXEL_FORMAT = b"\x00\x00\x00\x00" + struct.pack(">BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
ENCODINGS = struct.pack(">BxH", 2, 3) + struct.pack(">iii", 7, 0, -223)
UPDATE = struct.pack(">BBHHHH", 3, 1, 0, 0, 640, 400)
KEY = struct.pack(">BBxxI", 4, 1, 0x61)
POINTER = struct.pack(">BBHH", 5, 1, 100, 200)
CUT = struct.pack(">BxxxI", 6, 5) + b"hello"
FENCE = struct.pack(">BxxxIB", 248, 0, 4) + b"abcd"
CONTINUOUS = struct.pack(">BBHHHH", 150, 1, 0, 0, 640, 400)
QEMU_KEY = struct.pack(">BBHII", 255, 0, 1, 0x61, 30)
EXT_POINTER = struct.pack(">BBHHB", 5, 0x81, 1, 2, 1)
EXT_CUT = struct.pack(">Bxxxi", 6, -4) + b"\x00\x00\x00\x01"


def _handshaken(view_only: bool) -> tuple[ClientStream, bytes]:
    stream = ClientStream(view_only=view_only)
    return stream, stream.feed(HANDSHAKE)


def test_the_handshake_passes_with_client_init_made_shared() -> None:
    stream, out = _handshaken(view_only=True)
    assert out == b"RFB 003.008\n\x01\x01"
    assert stream.phase == "messages"


def test_vnc_authentication_response_passes_whole() -> None:
    stream = ClientStream(view_only=True)
    response = bytes(range(16))
    assert stream.feed(b"RFB 003.007\n\x02" + response + b"\x01") == b"RFB 003.007\n\x02" + response + b"\x01"
    assert stream.phase == "messages"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"RFB 003.003\n", "not RFB 3.7 or 3.8"),
        (b"GET / HTTP/1.1\r\n", "not RFB 3.7 or 3.8"),
        (b"RFB 003.008\n\x10", "security type 16"),
        (HANDSHAKE + b"\x07", "message type 7"),
        (HANDSHAKE + b"\x01" + b"\x00" * 10, "message type 1"),
        (HANDSHAKE + struct.pack(">BxH", 2, 5000), "5000 encodings"),
        (HANDSHAKE + struct.pack(">BxxxI", 6, MAX_CUT_TEXT + 1), "ClientCutText"),
        (HANDSHAKE + struct.pack(">BBH", 255, 1, 0), "sub-type 1"),
        (HANDSHAKE + struct.pack(">BxxxIB", 248, 0, 65), "ClientFence payload"),
    ],
)
def test_what_cannot_be_accounted_for_ends_the_stream(data: bytes, why: str) -> None:
    with pytest.raises(RfbViolation, match=why):
        ClientStream(view_only=False).feed(data)


def test_control_viewer_passes_every_message_unchanged() -> None:
    stream, _ = _handshaken(view_only=False)
    messages = [PIXEL_FORMAT, ENCODINGS, UPDATE, KEY, POINTER, CUT, FENCE, CONTINUOUS, QEMU_KEY, EXT_POINTER, EXT_CUT]
    assert stream.feed(b"".join(messages)) == b"".join(messages)
    assert stream.counts.passed == len(messages) and stream.counts.dropped == 0


def test_view_only_viewer_input_is_dropped_and_the_rest_passes() -> None:
    stream, _ = _handshaken(view_only=True)
    data = PIXEL_FORMAT + KEY + ENCODINGS + POINTER + UPDATE + CUT + QEMU_KEY + EXT_POINTER + EXT_CUT + FENCE
    assert stream.feed(data) == PIXEL_FORMAT + ENCODINGS + UPDATE + FENCE
    assert stream.counts.dropped == 6


def test_messages_split_anywhere_come_out_whole() -> None:
    """Fed one byte at a time, the output is the same and never holds part of a message."""
    data = HANDSHAKE + PIXEL_FORMAT + ENCODINGS + POINTER + CUT + UPDATE + KEY
    stream = ClientStream(view_only=True)
    pieces = [stream.feed(data[i : i + 1]) for i in range(len(data))]
    assert b"".join(pieces) == b"RFB 003.008\n\x01\x01" + PIXEL_FORMAT + ENCODINGS + UPDATE
    # Output appears only when a message is complete: the update comes out with its last byte.
    assert pieces[len(data) - len(KEY) - 1] == UPDATE


def test_a_key_hidden_in_a_cut_text_is_cut_text() -> None:
    """The bytes of a KeyEvent inside a ClientCutText's text are text, not a message."""
    stream, _ = _handshaken(view_only=True)
    sneaky = struct.pack(">BxxxI", 6, len(KEY)) + KEY
    assert stream.feed(sneaky + UPDATE) == UPDATE
