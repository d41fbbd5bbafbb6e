"""The few libX11 calls the desktop service needs, through ctypes: screen size, screen capture, the keyboard map.

Capturing in-process with XGetImage costs a few milliseconds for a full 1280x800 screen, where
spawning a capture tool costs tens. Every call opens its own connection and closes it: calls run
in worker threads, and a connection per call needs no locking.

Xlib's default error handlers print and exit the process. The agent must survive an X server that
goes away or a request that fails, so both handlers are replaced: protocol errors are recorded
and turned into exceptions, and an I/O error (server gone) no longer exits (libX11 >= 1.8 has
XSetIOErrorExitHandler; without it the risk stays that a server dying mid-call ends the agent).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

ZPIXMAP = 2
ALL_PLANES = 0xFFFFFFFFFFFFFFFF


class DisplayUnavailable(Exception):
    """The X display does not answer (not running, or no libX11 in this instance)."""


class CaptureError(Exception):
    """The X server refused the capture."""


class _XImage(ctypes.Structure):
    # The leading fields of Xlib's XImage (X11/Xlib.h), enough to read the pixels.
    _fields_ = [
        ("width", ctypes.c_int),
        ("height", ctypes.c_int),
        ("xoffset", ctypes.c_int),
        ("format", ctypes.c_int),
        ("data", ctypes.c_void_p),
        ("byte_order", ctypes.c_int),
        ("bitmap_unit", ctypes.c_int),
        ("bitmap_bit_order", ctypes.c_int),
        ("bitmap_pad", ctypes.c_int),
        ("depth", ctypes.c_int),
        ("bytes_per_line", ctypes.c_int),
        ("bits_per_pixel", ctypes.c_int),
        ("red_mask", ctypes.c_ulong),
        ("green_mask", ctypes.c_ulong),
        ("blue_mask", ctypes.c_ulong),
    ]


_ERROR_HANDLER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_IO_EXIT_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class _Lib:
    def __init__(self) -> None:
        name = ctypes.util.find_library("X11") or "libX11.so.6"
        try:
            x = ctypes.CDLL(name)
        except OSError:
            raise DisplayUnavailable("libX11 is not installed in this instance") from None
        x.XInitThreads()
        x.XOpenDisplay.argtypes = [ctypes.c_char_p]
        x.XOpenDisplay.restype = ctypes.c_void_p
        x.XCloseDisplay.argtypes = [ctypes.c_void_p]
        x.XDefaultScreen.argtypes = [ctypes.c_void_p]
        x.XDisplayWidth.argtypes = [ctypes.c_void_p, ctypes.c_int]
        x.XDisplayHeight.argtypes = [ctypes.c_void_p, ctypes.c_int]
        x.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        x.XDefaultRootWindow.restype = ctypes.c_ulong
        x.XGetImage.argtypes = [
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_ulong,
            ctypes.c_int,
        ]
        x.XGetImage.restype = ctypes.POINTER(_XImage)
        x.XDestroyImage.argtypes = [ctypes.POINTER(_XImage)]
        x.XStringToKeysym.argtypes = [ctypes.c_char_p]
        x.XStringToKeysym.restype = ctypes.c_ulong
        x.XKeysymToString.argtypes = [ctypes.c_ulong]
        x.XKeysymToString.restype = ctypes.c_char_p
        x.XDisplayKeycodes.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
        x.XGetKeyboardMapping.argtypes = [ctypes.c_void_p, ctypes.c_ubyte, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        x.XGetKeyboardMapping.restype = ctypes.POINTER(ctypes.c_ulong)
        x.XChangeKeyboardMapping.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_ulong),
            ctypes.c_int,
        ]
        x.XSync.argtypes = [ctypes.c_void_p, ctypes.c_int]
        x.XFree.argtypes = [ctypes.c_void_p]
        self.x = x
        self.errors = threading.local()
        # Kept as attributes: ctypes callbacks must outlive their registration.
        self._on_error = _ERROR_HANDLER(self._record_error)
        x.XSetErrorHandler(self._on_error)
        self._on_io_exit = _IO_EXIT_HANDLER(lambda display, data: None)
        if hasattr(x, "XSetIOErrorExitHandler"):
            x.XSetIOErrorExitHandler.argtypes = [ctypes.c_void_p, _IO_EXIT_HANDLER, ctypes.c_void_p]

        self.has_io_exit_handler = hasattr(x, "XSetIOErrorExitHandler")

    def _record_error(self, display: int | None, event: int | None) -> int:
        self.errors.failed = True
        return 0

    def open(self, display: str) -> int:
        handle = None
        # An X server resets when its last client leaves and refuses connections for a moment.
        for attempt in range(5):
            handle = self.x.XOpenDisplay(display.encode())
            if handle:
                break
            time.sleep(0.02 * (attempt + 1))
        if not handle:
            raise DisplayUnavailable(f"the X display {display} does not answer")
        if self.has_io_exit_handler:
            self.x.XSetIOErrorExitHandler(handle, self._on_io_exit, None)
        return int(handle)


_lib: _Lib | None = None
_lib_lock = threading.Lock()


def _load() -> _Lib:
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _Lib()
        return _lib


@dataclass(frozen=True)
class Capture:
    """Pixels of a screen area: 32-bit BGRX rows of `stride` bytes."""

    width: int
    height: int
    stride: int
    pixels: bytes


def screen_size(display: str) -> tuple[int, int]:
    """Width and height of the default screen of `display`."""
    lib = _load()
    handle = lib.open(display)
    try:
        screen = lib.x.XDefaultScreen(handle)
        return int(lib.x.XDisplayWidth(handle, screen)), int(lib.x.XDisplayHeight(handle, screen))
    finally:
        lib.x.XCloseDisplay(handle)


def capture(display: str, region: tuple[int, int, int, int] | None) -> Capture:
    """Pixels of `region` (x, y, width, height; the whole screen when None), which must be on screen."""
    lib = _load()
    handle = lib.open(display)
    try:
        screen = lib.x.XDefaultScreen(handle)
        width, height = int(lib.x.XDisplayWidth(handle, screen)), int(lib.x.XDisplayHeight(handle, screen))
        x, y, w, h = region or (0, 0, width, height)
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > width or y + h > height:
            raise ValueError(f"region {x},{y} {w}x{h} is not inside the {width}x{height} screen")
        lib.errors.failed = False
        image = lib.x.XGetImage(handle, lib.x.XDefaultRootWindow(handle), x, y, w, h, ALL_PLANES, ZPIXMAP)
        if not image or lib.errors.failed:
            raise CaptureError("the X server refused to capture the screen")
        try:
            img = image.contents
            if img.bits_per_pixel != 32 or img.red_mask != 0xFF0000 or img.blue_mask != 0xFF:
                raise CaptureError(
                    f"unsupported screen format: {img.depth}-bit depth, {img.bits_per_pixel} bits per pixel"
                )
            pixels = ctypes.string_at(img.data, img.bytes_per_line * img.height)
            return Capture(img.width, img.height, img.bytes_per_line, pixels)
        finally:
            lib.x.XDestroyImage(image)
    finally:
        lib.x.XCloseDisplay(handle)


class _KeyboardSlots:
    """Keycodes this agent gave to keysyms the keyboard map lacked, per display, least recently used first.

    xdotool types a character that is not on the keyboard by binding it to a spare keycode, sending
    the key, and unbinding it again right away. A client translates a key event into a character
    when it reads the event, through the map it fetches then; a client a few milliseconds behind
    (any busy machine) fetches the map after the unbinding and drops the character (seen beside a
    CPU hog; a Tk window that takes 40 ms per key lost every one of "äöü ✓ é"). So such keysyms
    are bound here before xdotool starts, and stay bound: xdotool then finds them on the map and
    never rebinds. One spare keycode is always left unbound for xdotool's own binding, for
    whatever did not fit.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_display: dict[str, OrderedDict[int, int]] = {}  # keysym -> keycode, oldest use first


_SLOTS = _KeyboardSlots()


def bind_keysyms(display: str, keysyms: Iterable[int]) -> int:
    """Put each of `keysyms` the keyboard map of `display` lacks on a keycode of its own; how many were bound.

    A keysym that finds no keycode (more new keysyms than spare keycodes) is left to xdotool.
    """
    wanted = list(dict.fromkeys(k for k in keysyms if k))
    if not wanted:
        return 0
    lib = _load()
    with _SLOTS.lock:
        handle = lib.open(display)
        try:
            low, high = ctypes.c_int(), ctypes.c_int()
            lib.x.XDisplayKeycodes(handle, ctypes.byref(low), ctypes.byref(high))
            count = high.value - low.value + 1
            per = ctypes.c_int()
            table = lib.x.XGetKeyboardMapping(handle, low.value, count, ctypes.byref(per))
            if not table:
                return 0
            try:
                width = per.value
                codes = {low.value + i: tuple(table[i * width + j] for j in range(width)) for i in range(count)}
            finally:
                lib.x.XFree(table)
            mapped = {sym for syms in codes.values() for sym in syms if sym}
            ours = _SLOTS.by_display.setdefault(display, OrderedDict())
            for sym, code in list(ours.items()):  # somebody else remapped it meanwhile: no longer ours
                if sym not in codes.get(code, ()):
                    del ours[sym]
            for sym in wanted:
                if sym in ours:
                    ours.move_to_end(sym)
            missing = [sym for sym in wanted if sym not in mapped]
            spare = [code for code, syms in codes.items() if not any(syms)][:-1]  # the last is xdotool's
            reusable = [code for sym, code in ours.items() if sym not in wanted]
            slots = spare + reusable
            lib.errors.failed = False
            bound = 0
            for sym, code in zip(missing, slots, strict=False):
                for old, held in list(ours.items()):
                    if held == code:
                        del ours[old]
                row = (ctypes.c_ulong * width)(*([sym] * width))
                lib.x.XChangeKeyboardMapping(handle, code, width, row, 1)
                ours[sym] = code
                bound += 1
            lib.x.XSync(handle, 0)
            if lib.errors.failed:  # refused (another client's grab of the map?): xdotool binds them itself
                ours.clear()
                return 0
            return bound
        finally:
            lib.x.XCloseDisplay(handle)


def char_keysym(char: str) -> int:
    """The keysym xdotool types `char` with: Latin-1 by its code, the rest as a Unicode keysym; 0 for a control."""
    code = ord(char)
    if code < 0x20 or 0x7F <= code < 0xA0:
        return 0
    return code if code <= 0xFF else 0x01000000 | code


def keysym_exists(name: str) -> bool:
    """Whether `name` is an X keysym name (e.g. "Return", "ctrl" is not; "Control_L" is)."""
    try:
        lib = _load()
    except DisplayUnavailable:
        return True  # Without libX11 xdotool cannot run either; it will say so.
    return bool(lib.x.XStringToKeysym(name.encode()))


def keysym_name(char: str) -> str | None:
    """The keysym name of a Latin-1 character (e.g. "-" -> "minus"), if it has one."""
    code = ord(char)
    if code > 0xFF:
        return None
    try:
        lib = _load()
    except DisplayUnavailable:
        return None
    raw = lib.x.XKeysymToString(code)
    return raw.decode() if raw else None
