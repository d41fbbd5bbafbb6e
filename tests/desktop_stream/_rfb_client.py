"""A minimal RFB client over the gateway's desktop WebSocket, for tests and the bench.

It speaks what noVNC speaks at the start (3.8, security None, shared ClientInit, raw pixels) and
can send input and wait for a framebuffer update: the server handles a client's messages in order,
so the update answering a request sent after an input message proves that input was handled (or
dropped) before it.
"""

from __future__ import annotations

import struct
from typing import Any

from websockets.sync.client import ClientConnection, connect

RAW = 0


class RfbClient:
    """One viewer connection: handshake done in `open`, then input and update requests."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._buf = bytearray()
        self.width = self.height = 0

    @classmethod
    def open(cls, url: str, subprotocols: list[str], headers: dict[str, str] | None = None) -> RfbClient:
        """Connect and run the handshake (raises websockets' InvalidStatus when the gateway refuses)."""
        # Entered as a context manager: websockets >= 17.1 warns about a bare connect().
        ws = connect(
            url,
            subprotocols=subprotocols,  # type: ignore[arg-type]
            additional_headers=headers or {},
            open_timeout=30,
            max_size=None,
        ).__enter__()
        client = cls(ws)
        client._handshake()
        return client

    def _read(self, n: int, timeout: float = 30) -> bytes:
        while len(self._buf) < n:
            data: Any = self.ws.recv(timeout=timeout)
            assert isinstance(data, bytes), f"text frame from the gateway: {data!r}"
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _handshake(self) -> None:
        assert self._read(12).startswith(b"RFB 003.")
        self.ws.send(b"RFB 003.008\n")
        count = self._read(1)[0]
        types = self._read(count)
        assert 1 in types, f"the server offers no security None: {list(types)}"
        self.ws.send(b"\x01")
        assert self._read(4) == b"\x00\x00\x00\x00"  # SecurityResult OK
        self.ws.send(b"\x00")  # ClientInit asking for exclusive access: the gateway makes it shared
        self.width, self.height = struct.unpack(">HH", self._read(4))
        self._read(16)  # pixel format
        (name_length,) = struct.unpack(">I", self._read(4))
        self._read(name_length)
        # 32-bit true colour little-endian, raw encoding only: simple to read.
        self.ws.send(b"\x00\x00\x00\x00" + struct.pack(">BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))
        self.ws.send(struct.pack(">BxHi", 2, 1, RAW))

    def pointer(self, x: int, y: int, buttons: int = 0) -> None:
        """A PointerEvent."""
        self.ws.send(struct.pack(">BBHH", 5, buttons, x, y))

    def key(self, keysym: int, down: bool) -> None:
        """A KeyEvent."""
        self.ws.send(struct.pack(">BBxxI", 4, int(down), keysym))

    def update(self, x: int = 0, y: int = 0, w: int = 1, h: int = 1, incremental: bool = False) -> bytes:
        """Request an update of a region and return the first rectangle's raw pixels (BGRX)."""
        self.ws.send(struct.pack(">BBHHHH", 3, int(incremental), x, y, w, h))
        while True:
            kind = self._read(1)[0]
            if kind == 0:  # FramebufferUpdate
                self._read(1)
                (rects,) = struct.unpack(">H", self._read(2))
                first = b""
                for _ in range(rects):
                    _x, _y, rw, rh, enc = struct.unpack(">HHHHi", self._read(12))
                    if enc == RAW:
                        pixels = self._read(rw * rh * 4)
                        first = first or pixels
                    elif enc == -223:  # DesktopSize: no data
                        continue
                    else:
                        raise AssertionError(f"unexpected encoding {enc}")
                return first
            if kind == 2:  # Bell
                continue
            if kind == 3:  # ServerCutText
                self._read(3)
                (length,) = struct.unpack(">I", self._read(4))
                self._read(length)
                continue
            raise AssertionError(f"unexpected server message {kind}")

    def close(self) -> None:
        """Close the socket."""
        self.ws.close()
