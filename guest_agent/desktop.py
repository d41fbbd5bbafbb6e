"""DesktopService: screenshots, mouse and keyboard of the instance's X display, for computer use.

Screenshots are captured in-process through libX11 (guest_agent/_x11.py) and encoded with Pillow;
input goes through xdotool, one short subprocess per call with DISPLAY set. Without a display, or
when its X server does not answer, every call is FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import io
import re

import grpc

from cyberdesk_common.status import RpcError, failed_precondition, invalid_argument
from cyberdesk_proto.v1 import desktop_pb2, desktop_pb2_grpc
from guest_agent import _x11
from guest_agent.identity import Identity

_NO_DESKTOP = "this instance has no desktop; create it with desktop enabled"
_BUTTONS: dict[int, int] = {
    desktop_pb2.MOUSE_BUTTON_UNSPECIFIED: 1,
    desktop_pb2.MOUSE_BUTTON_LEFT: 1,
    desktop_pb2.MOUSE_BUTTON_MIDDLE: 2,
    desktop_pb2.MOUSE_BUTTON_RIGHT: 3,
}
# X maps the wheel to buttons 4-7.
_WHEEL: dict[int, int] = {
    desktop_pb2.SCROLL_DIRECTION_UNSPECIFIED: 5,
    desktop_pb2.SCROLL_DIRECTION_UP: 4,
    desktop_pb2.SCROLL_DIRECTION_DOWN: 5,
    desktop_pb2.SCROLL_DIRECTION_LEFT: 6,
    desktop_pb2.SCROLL_DIRECTION_RIGHT: 7,
}
MAX_CLICKS = 100
MAX_SCROLL = 200
MAX_TEXT = 100_000
MAX_DELAY_MS = 1000

# Names people and models use for keys, to X keysym names (compared case-insensitively).
KEY_ALIASES = {
    "ctrl": "ctrl",
    "control": "ctrl",
    "alt": "alt",
    "option": "alt",
    "shift": "shift",
    "super": "super",
    "win": "super",
    "windows": "super",
    "meta": "super",
    "cmd": "super",
    "command": "super",
    "enter": "Return",
    "return": "Return",
    "esc": "Escape",
    "escape": "Escape",
    "tab": "Tab",
    "space": "space",
    "backspace": "BackSpace",
    "delete": "Delete",
    "del": "Delete",
    "insert": "Insert",
    "ins": "Insert",
    "home": "Home",
    "end": "End",
    "pageup": "Page_Up",
    "pgup": "Page_Up",
    "pagedown": "Page_Down",
    "pgdn": "Page_Down",
    "up": "Up",
    "down": "Down",
    "left": "Left",
    "right": "Right",
    "capslock": "Caps_Lock",
    "printscreen": "Print",
    "print": "Print",
    "menu": "Menu",
    "plus": "plus",
    "minus": "minus",
}
_FUNCTION_KEY = re.compile(r"f([1-9]|1[0-9]|2[0-4])", re.IGNORECASE)


def key_name(key: str, combo: str) -> str:
    """The xdotool name of one key of a combination, or INVALID_ARGUMENT naming it."""
    if not key:
        raise invalid_argument(f"empty key in {combo!r} (join keys with '+', e.g. 'ctrl+shift+t')")
    alias = KEY_ALIASES.get(key.lower())
    if alias:
        return alias
    if _FUNCTION_KEY.fullmatch(key):
        return key.upper()
    if len(key) == 1:
        if key.isalnum() and key.isascii():
            return key
        named = _x11.keysym_name(key)
        # Other characters travel as Unicode keysyms, which xdotool maps to a free keycode.
        return named or f"U{ord(key):04X}"
    if _x11.keysym_exists(key):
        return key
    raise invalid_argument(f"unknown key {key!r} in {combo!r}: use an X keysym name or one of {', '.join(KEY_ALIASES)}")


def parse_combo(combo: str) -> str:
    """`ctrl+shift+t` -> `ctrl+shift+t` in xdotool's names; a lone or trailing `+` is the plus key."""
    if combo == "+":
        return "plus"
    parts = [*combo[:-2].split("+"), "plus"] if combo.endswith("++") else combo.split("+")
    return "+".join(key_name(part.strip(), combo) for part in parts)


class DesktopServicer(desktop_pb2_grpc.DesktopServiceServicer):
    """Serves cyberdesk.v1.DesktopService on the display in the agent's environment (DISPLAY)."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity

    def _display(self, instance_id: str) -> str:
        self._identity.check(instance_id)
        display = self._identity.display
        if not display:
            raise failed_precondition(_NO_DESKTOP)
        return display

    async def _screen(self, display: str) -> tuple[int, int]:
        try:
            return await asyncio.to_thread(_x11.screen_size, display)
        except _x11.DisplayUnavailable as err:
            raise failed_precondition(f"{_NO_DESKTOP} ({err})") from None

    async def _bind_keys(self, display: str, keysyms: list[int]) -> None:
        """Bind the keysyms the keyboard lacks before xdotool types them (why: `_x11._KeyboardSlots`)."""
        if not any(keysyms):
            return  # nothing but ASCII: no X round trip
        try:
            await asyncio.to_thread(_x11.bind_keysyms, display, keysyms)
        except _x11.DisplayUnavailable as err:
            raise failed_precondition(f"{_NO_DESKTOP} ({err})") from None

    async def _point(self, display: str, point: desktop_pb2.Point, field: str) -> tuple[int, int]:
        width, height = await self._screen(display)
        if not (0 <= point.x < width and 0 <= point.y < height):
            raise invalid_argument(f"{field} ({point.x}, {point.y}) is outside the {width}x{height} screen")
        return point.x, point.y

    async def _xdotool(self, display: str, *args: str, stdin: bytes | None = None, limit: float = 10) -> str:
        env = {**self._identity.env, "DISPLAY": display}
        try:
            proc = await asyncio.create_subprocess_exec(
                "xdotool",
                *args,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        except FileNotFoundError:
            raise failed_precondition("xdotool is not installed in this instance; the desktop needs it") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), limit)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"xdotool {args[0]} took more than {limit:.0f}s"
            ) from None
        finally:
            if proc.returncode is None:
                # Cancelled call: do not leave input half-typed.
                proc.kill()
        text = err.decode(errors="replace").strip()
        if "Can't open display" in text or "Failed creating new xdo" in text:
            raise failed_precondition(f"{_NO_DESKTOP} (the X display {display} does not answer)")
        if proc.returncode != 0:
            raise RpcError(grpc.StatusCode.UNKNOWN, f"xdotool {args[0]} failed (exit {proc.returncode}): {text}")
        return out.decode(errors="replace")

    async def TakeScreenshot(
        self,
        request: desktop_pb2.TakeScreenshotRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> desktop_pb2.TakeScreenshotResponse:
        """Capture the screen (or `region`), scale it, encode it as PNG or JPEG."""
        display = self._display(request.instance_id)
        fmt = request.format or desktop_pb2.IMAGE_FORMAT_PNG
        if fmt not in (desktop_pb2.IMAGE_FORMAT_PNG, desktop_pb2.IMAGE_FORMAT_JPEG):
            raise invalid_argument(f"format {request.format} is not PNG (1) or JPEG (2)")
        quality = request.quality or 80
        if not 1 <= quality <= 100:
            raise invalid_argument(f"quality must be 1-100, got {request.quality}")
        scale = request.scale or 1.0
        if not 0 < scale <= 1:
            raise invalid_argument(f"scale must be in (0, 1], got {request.scale}")
        region = None
        if request.HasField("region"):
            r = request.region
            region = (r.x, r.y, r.width, r.height)
        try:
            image, width, height = await asyncio.to_thread(_screenshot, display, region, fmt, quality, scale)
        except _x11.DisplayUnavailable as err:
            raise failed_precondition(f"{_NO_DESKTOP} ({err})") from None
        except ValueError as err:
            raise invalid_argument(str(err)) from None
        except _x11.CaptureError as err:
            raise RpcError(grpc.StatusCode.UNKNOWN, str(err)) from None
        return desktop_pb2.TakeScreenshotResponse(image=image, format=fmt, width=width, height=height)

    async def MoveMouse(
        self,
        request: desktop_pb2.MoveMouseRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> desktop_pb2.MoveMouseResponse:
        """Move the pointer to `position`."""
        display = self._display(request.instance_id)
        if not request.HasField("position"):
            raise invalid_argument("position is required")
        x, y = await self._point(display, request.position, "position")
        await self._xdotool(display, "mousemove", "--sync", str(x), str(y))
        return desktop_pb2.MoveMouseResponse()

    async def _move_args(self, display: str, has_position: bool, point: desktop_pb2.Point) -> list[str]:
        if not has_position:
            return []
        x, y = await self._point(display, point, "position")
        return ["mousemove", "--sync", str(x), str(y)]

    async def ClickMouse(
        self,
        request: desktop_pb2.ClickMouseRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> desktop_pb2.ClickMouseResponse:
        """Click `button` `count` times, at `position` when given."""
        display = self._display(request.instance_id)
        count = request.count or 1
        if not 1 <= count <= MAX_CLICKS:
            raise invalid_argument(f"count must be 1-{MAX_CLICKS}, got {request.count}")
        button = _button(request.button)
        move = await self._move_args(display, request.HasField("position"), request.position)
        await self._xdotool(display, *move, "click", "--repeat", str(count), "--delay", "60", str(button))
        return desktop_pb2.ClickMouseResponse()

    async def PressMouse(
        self,
        request: desktop_pb2.PressMouseRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> desktop_pb2.PressMouseResponse:
        """Press `button` and keep it down."""
        await self._button_action(request, "mousedown")
        return desktop_pb2.PressMouseResponse()

    async def ReleaseMouse(
        self,
        request: desktop_pb2.ReleaseMouseRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> desktop_pb2.ReleaseMouseResponse:
        """Release `button`."""
        await self._button_action(request, "mouseup")
        return desktop_pb2.ReleaseMouseResponse()

    async def _button_action(
        self, request: desktop_pb2.PressMouseRequest | desktop_pb2.ReleaseMouseRequest, action: str
    ) -> None:
        """`action` (mousedown or mouseup) of the request's button, after the optional move."""
        display = self._display(request.instance_id)
        button = _button(request.button)
        move = await self._move_args(display, request.HasField("position"), request.position)
        await self._xdotool(display, *move, action, str(button))

    async def DragMouse(
        self,
        request: desktop_pb2.DragMouseRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> desktop_pb2.DragMouseResponse:
        """Press at `start`, move to `end` with the button held, release."""
        display = self._display(request.instance_id)
        if not (request.HasField("start") and request.HasField("end")):
            raise invalid_argument("start and end are required")
        sx, sy = await self._point(display, request.start, "start")
        ex, ey = await self._point(display, request.end, "end")
        button = str(_button(request.button))
        # A pause and an intermediate motion: toolkits start a drag only after seeing the pointer
        # move with the button down.
        await self._xdotool(
            display,
            *("mousemove", "--sync", str(sx), str(sy), "mousedown", button, "sleep", "0.05"),
            *("mousemove", "--sync", str((sx + ex) // 2), str((sy + ey) // 2), "sleep", "0.05"),
            *("mousemove", "--sync", str(ex), str(ey), "sleep", "0.05", "mouseup", button),
        )
        return desktop_pb2.DragMouseResponse()

    async def Scroll(
        self,
        request: desktop_pb2.ScrollRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> desktop_pb2.ScrollResponse:
        """Turn the wheel `amount` steps in `direction`, at `position` when given."""
        display = self._display(request.instance_id)
        amount = request.amount or 1
        if not 1 <= amount <= MAX_SCROLL:
            raise invalid_argument(f"amount must be 1-{MAX_SCROLL}, got {request.amount}")
        wheel = _WHEEL.get(request.direction)
        if wheel is None:
            raise invalid_argument(f"direction {request.direction} is not UP, DOWN, LEFT or RIGHT")
        move = await self._move_args(display, request.HasField("position"), request.position)
        await self._xdotool(display, *move, "click", "--repeat", str(amount), "--delay", "20", str(wheel))
        return desktop_pb2.ScrollResponse()

    async def TypeText(
        self,
        request: desktop_pb2.TypeTextRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> desktop_pb2.TypeTextResponse:
        """Type Unicode `text` into the focused window."""
        display = self._display(request.instance_id)
        if len(request.text) > MAX_TEXT:
            raise invalid_argument(f"text is longer than {MAX_TEXT} characters; type it in parts")
        delay = request.delay_ms or 12
        if not 0 < delay <= MAX_DELAY_MS:
            raise invalid_argument(f"delay_ms must be 1-{MAX_DELAY_MS}, got {request.delay_ms}")
        if not request.text:
            await self._screen(display)  # Still say when there is no desktop.
            return desktop_pb2.TypeTextResponse()
        await self._bind_keys(display, [_x11.char_keysym(c) for c in set(request.text) if not c.isascii()])
        # The text goes through stdin: no argv length limit, and a leading "-" is not an option.
        budget = 10 + len(request.text) * delay / 1000 * 2
        await self._xdotool(
            display, "type", "--delay", str(delay), "--file", "-", stdin=request.text.encode(), limit=budget
        )
        return desktop_pb2.TypeTextResponse()

    async def PressKeys(
        self,
        request: desktop_pb2.PressKeysRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> desktop_pb2.PressKeysResponse:
        """Press each key combination of `keys` in order (e.g. "ctrl+shift+t", "Return")."""
        display = self._display(request.instance_id)
        if not request.keys:
            raise invalid_argument("keys is empty; give combinations such as 'ctrl+c' or 'Return'")
        combos = [parse_combo(combo) for combo in request.keys]
        # Characters given as keys ("ö", "ctrl+é"); ASCII ones are on every keyboard map.
        chars = {part for combo in request.keys for part in combo.split("+") if len(part) == 1 and not part.isascii()}
        await self._bind_keys(display, [_x11.char_keysym(c) for c in chars])
        await self._xdotool(display, "key", "--delay", "20", *combos, limit=10 + len(combos) * 0.1)
        return desktop_pb2.PressKeysResponse()

    async def GetCursorPosition(
        self,
        request: desktop_pb2.GetCursorPositionRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> desktop_pb2.GetCursorPositionResponse:
        """Where the pointer is."""
        display = self._display(request.instance_id)
        out = await self._xdotool(display, "getmouselocation", "--shell")
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        try:
            point = desktop_pb2.Point(x=int(values["X"]), y=int(values["Y"]))
        except (KeyError, ValueError):
            raise RpcError(grpc.StatusCode.UNKNOWN, f"unexpected xdotool output: {out!r}") from None
        return desktop_pb2.GetCursorPositionResponse(position=point)

    async def GetDisplayInfo(
        self,
        request: desktop_pb2.GetDisplayInfoRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> desktop_pb2.GetDisplayInfoResponse:
        """Screen size and display name."""
        display = self._display(request.instance_id)
        width, height = await self._screen(display)
        return desktop_pb2.GetDisplayInfoResponse(width=width, height=height, display=display)


def _button(value: int) -> int:
    button = _BUTTONS.get(value)
    if button is None:
        raise invalid_argument(f"button {value} is not LEFT, MIDDLE or RIGHT")
    return button


def _screenshot(
    display: str,
    region: tuple[int, int, int, int] | None,
    fmt: int,
    quality: int,
    scale: float,
) -> tuple[bytes, int, int]:
    """Capture and encode (runs in a worker thread: Pillow releases the GIL while encoding)."""
    from PIL import Image  # Imported on first use: agents without a desktop never load it.

    shot = _x11.capture(display, region)
    image = Image.frombuffer("RGB", (shot.width, shot.height), shot.pixels, "raw", "BGRX", shot.stride, 1)
    if scale < 1:
        size = (max(1, round(shot.width * scale)), max(1, round(shot.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    if fmt == desktop_pb2.IMAGE_FORMAT_JPEG:
        image.save(out, "JPEG", quality=quality)
    else:
        # compress_level 1: a screen of flat colours compresses almost as well, many times faster.
        image.save(out, "PNG", compress_level=1)
    return out.getvalue(), image.width, image.height


__all__ = ["DesktopServicer", "key_name", "parse_combo"]
