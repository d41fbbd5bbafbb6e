"""The client-to-server half of RFB (the VNC protocol, RFC 6143), parsed so the gateway can enforce view-only.

A viewer's bytes pass through `ClientStream.feed`, which returns the bytes to send on to the VNC
server: every message is checked for its type and length, and a view-only viewer's input
(KeyEvent, PointerEvent, ClientCutText, QEMU extended KeyEvent) is dropped. Passed besides: the
RFB core's SetPixelFormat, SetEncodings, FramebufferUpdateRequest, and two extensions noVNC uses
when a server offers them, EnableContinuousUpdates and ClientFence (their lengths are fixed by the
community rfbproto, so the gateway and any server that knows them split the stream alike, and a
server that does not know them closes the connection). Anything the parser cannot account for ends
the stream (`RfbViolation`): a message type it does not know has no known length, so passing it on
would let the rest of the stream be read as something else, and a client that wants input could
hide a KeyEvent behind it. The server's bytes are not parsed: nothing a server sends acts on the
desktop.

The handshake, client side: ProtocolVersion (12 bytes, "RFB 003.00x\\n"; 3.7 and 3.8 are
accepted, 3.3 is not: there the server picks the security type and its choice decides how many
bytes the client sends next, which only parsing the server's half would tell), the chosen security
type (1 byte: None, or VNC authentication followed by its 16-byte response), ClientInit (1 byte,
the shared flag, always rewritten to "shared" so that no viewer can disconnect the others).

Pure: no I/O, no clock; `tests/gateway_svc/unit/test_rfb.py` drives it byte by byte.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

SET_PIXEL_FORMAT = 0
SET_ENCODINGS = 2
FRAMEBUFFER_UPDATE_REQUEST = 3
KEY_EVENT = 4
POINTER_EVENT = 5
CLIENT_CUT_TEXT = 6
ENABLE_CONTINUOUS_UPDATES = 150
CLIENT_FENCE = 248
QEMU = 255  # with sub-type 0: QEMU extended key event

SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2

INPUT_MESSAGES = frozenset({KEY_EVENT, POINTER_EVENT, CLIENT_CUT_TEXT, QEMU})
# Fixed-size messages: their whole length, type byte included.
_FIXED = {
    SET_PIXEL_FORMAT: 20,
    FRAMEBUFFER_UPDATE_REQUEST: 10,
    KEY_EVENT: 8,
    ENABLE_CONTINUOUS_UPDATES: 10,
}
MAX_FENCE_PAYLOAD = 64
MAX_ENCODINGS = 1024  # noVNC sends about 30
MAX_CUT_TEXT = 1024 * 1024  # clipboard text a viewer may paste into the desktop at once
_VERSIONS = {b"RFB 003.007\n": (3, 7), b"RFB 003.008\n": (3, 8)}


class RfbViolation(Exception):
    """The client broke the protocol (or asked for what the gateway does not pass); the stream must end."""


class _Phase(enum.Enum):
    VERSION = "protocol version"
    SECURITY = "security type"
    VNC_AUTH = "VNC authentication response"
    CLIENT_INIT = "ClientInit"
    MESSAGES = "messages"


@dataclass
class Counts:
    """What went through: messages passed on and dropped, by type."""

    passed: int = 0
    dropped: int = 0


class ClientStream:
    """Parses a viewer's bytes; `feed` returns what to send to the server, raises RfbViolation to end."""

    def __init__(self, *, view_only: bool, max_cut_text: int = MAX_CUT_TEXT) -> None:
        self.view_only = view_only
        self.max_cut_text = max_cut_text
        self.counts = Counts()
        self._phase = _Phase.VERSION
        self._buffer = bytearray()

    @property
    def phase(self) -> str:
        """Where the stream is: "protocol version", ..., "messages"."""
        return self._phase.value

    def feed(self, data: bytes) -> bytes:
        """Bytes to pass on for `data` (possibly none: a partial message is kept until it is whole)."""
        self._buffer += data
        out = bytearray()
        while True:
            size = self._next_size()
            if size is None or len(self._buffer) < size:
                return bytes(out)
            unit = bytes(self._buffer[:size])
            del self._buffer[:size]
            out += self._take(unit)

    def _next_size(self) -> int | None:
        """How many bytes the next unit has, or None while that is not known yet."""
        phase, buf = self._phase, self._buffer
        if phase is _Phase.VERSION:
            return 12
        if phase is _Phase.SECURITY or phase is _Phase.CLIENT_INIT:
            return 1
        if phase is _Phase.VNC_AUTH:
            return 16
        if not buf:
            return None
        kind = buf[0]
        if kind in _FIXED:
            return _FIXED[kind]
        if kind == POINTER_EVENT:
            if len(buf) < 2:
                return None
            # The marker bit of the ExtendedMouseButtons extension adds one byte of buttons.
            return 7 if buf[1] & 0x80 else 6
        if kind == CLIENT_FENCE:
            if len(buf) < 9:
                return None
            if buf[8] > MAX_FENCE_PAYLOAD:
                raise RfbViolation(f"ClientFence payload of {buf[8]} bytes (at most {MAX_FENCE_PAYLOAD})")
            return 9 + buf[8]
        if kind == QEMU:
            if len(buf) < 2:
                return None
            if buf[1] != 0:
                raise RfbViolation(f"QEMU client message sub-type {buf[1]} is not passed by the gateway")
            return 12
        if kind == SET_ENCODINGS:
            if len(buf) < 4:
                return None
            count: int = struct.unpack_from(">H", buf, 2)[0]
            if count > MAX_ENCODINGS:
                raise RfbViolation(f"SetEncodings lists {count} encodings (at most {MAX_ENCODINGS})")
            return 4 + 4 * count
        if kind == CLIENT_CUT_TEXT:
            if len(buf) < 8:
                return None
            signed: int = struct.unpack_from(">i", buf, 4)[0]
            # A negative length is the Extended Clipboard extension's: its absolute value follows.
            length = abs(signed)
            if length > self.max_cut_text:
                raise RfbViolation(f"ClientCutText of {length} bytes (at most {self.max_cut_text})")
            return 8 + length
        raise RfbViolation(f"client message type {kind} is not passed by the gateway")

    def _take(self, unit: bytes) -> bytes:
        """What to pass on for one complete unit, advancing the phase."""
        phase = self._phase
        if phase is _Phase.VERSION:
            if unit not in _VERSIONS:
                raise RfbViolation(f"protocol version {unit[:11]!r} is not RFB 3.7 or 3.8")
            self._phase = _Phase.SECURITY
            return unit
        if phase is _Phase.SECURITY:
            if unit[0] == SECURITY_NONE:
                self._phase = _Phase.CLIENT_INIT
            elif unit[0] == SECURITY_VNC_AUTH:
                self._phase = _Phase.VNC_AUTH
            else:
                raise RfbViolation(f"security type {unit[0]} is not None (1) or VNC authentication (2)")
            return unit
        if phase is _Phase.VNC_AUTH:
            self._phase = _Phase.CLIENT_INIT
            return unit
        if phase is _Phase.CLIENT_INIT:
            self._phase = _Phase.MESSAGES
            return b"\x01"  # shared: a viewer asking for the desktop alone would end the others' sessions
        if self.view_only and unit[0] in INPUT_MESSAGES:
            self.counts.dropped += 1
            return b""
        self.counts.passed += 1
        return unit


__all__ = ["INPUT_MESSAGES", "ClientStream", "Counts", "RfbViolation"]
