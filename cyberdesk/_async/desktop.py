"""`instance.desktop`: screenshots, mouse and keyboard of an instance's desktop."""

from __future__ import annotations

from typing import Literal

from cyberdesk._async._transport import AsyncTransport
from cyberdesk._models import DesktopViewerLink, Screenshot, screenshot_from_proto
from cyberdesk._requests import Button, Direction, button, direction, duration, point, screenshot_request
from cyberdesk_proto.v1 import desktop_pb2, ports_pb2


class AsyncDesktop:
    """The desktop of one instance (created with desktop=True; otherwise calls fail with FailedPrecondition)."""

    def __init__(self, transport: AsyncTransport, instance_id: str) -> None:
        self._t = transport
        self._id = instance_id

    async def screenshot(
        self,
        *,
        format: Literal["png", "jpeg"] = "png",
        quality: int = 0,
        region: tuple[int, int, int, int] | None = None,
        scale: float = 0.0,
    ) -> Screenshot:
        """Capture the screen (or region=(x, y, width, height)), optionally scaled by 0 < scale <= 1."""
        request = screenshot_request(self._id, format=format, quality=quality, region=region, scale=scale)
        reply = await self._t.unary(self._t.desktop.TakeScreenshot, request)
        return screenshot_from_proto(reply)

    async def move(self, x: int, y: int) -> None:
        """Move the pointer to (x, y)."""
        request = desktop_pb2.MoveMouseRequest(instance_id=self._id, position=desktop_pb2.Point(x=x, y=y))
        await self._t.unary(self._t.desktop.MoveMouse, request)

    async def click(
        self, x: int | None = None, y: int | None = None, *, button: Button = "left", count: int = 1
    ) -> None:
        """Click (count=2: double click), at (x, y) when given, else where the pointer is."""
        request = desktop_pb2.ClickMouseRequest(instance_id=self._id, button=_button(button), count=count)
        where = point(x, y)
        if where is not None:
            request.position.CopyFrom(where)
        await self._t.unary(self._t.desktop.ClickMouse, request)

    async def drag(self, start: tuple[int, int], end: tuple[int, int], *, button: Button = "left") -> None:
        """Drag from start to end with a button held."""
        request = desktop_pb2.DragMouseRequest(
            instance_id=self._id,
            start=desktop_pb2.Point(x=start[0], y=start[1]),
            end=desktop_pb2.Point(x=end[0], y=end[1]),
            button=_button(button),
        )
        await self._t.unary(self._t.desktop.DragMouse, request)

    async def scroll(
        self, direction: Direction = "down", amount: int = 1, *, x: int | None = None, y: int | None = None
    ) -> None:
        """Scroll `amount` wheel steps, at (x, y) when given."""
        request = desktop_pb2.ScrollRequest(instance_id=self._id, direction=_direction(direction), amount=amount)
        where = point(x, y)
        if where is not None:
            request.position.CopyFrom(where)
        await self._t.unary(self._t.desktop.Scroll, request)

    async def type(self, text: str, *, delay_ms: int = 0) -> None:
        """Type Unicode text into the focused window."""
        request = desktop_pb2.TypeTextRequest(instance_id=self._id, text=text, delay_ms=delay_ms)
        await self._t.unary(self._t.desktop.TypeText, request)

    async def press(self, *keys: str) -> None:
        """Press key combinations in order, e.g. press("ctrl+l", "Return")."""
        request = desktop_pb2.PressKeysRequest(instance_id=self._id, keys=list(keys))
        await self._t.unary(self._t.desktop.PressKeys, request)

    async def cursor(self) -> tuple[int, int]:
        """The pointer position (x, y)."""
        request = desktop_pb2.GetCursorPositionRequest(instance_id=self._id)
        reply = await self._t.unary(self._t.desktop.GetCursorPosition, request)
        return reply.position.x, reply.position.y

    async def size(self) -> tuple[int, int]:
        """The screen size (width, height)."""
        request = desktop_pb2.GetDisplayInfoRequest(instance_id=self._id)
        reply = await self._t.unary(self._t.desktop.GetDisplayInfo, request)
        return reply.width, reply.height

    async def stream_url(self, *, view_only: bool = False, ttl: float = 3600.0) -> str:
        """A link to watch the desktop live in a browser (and drive it, unless `view_only`), valid `ttl` seconds.

        Anyone holding the link gets in until it expires, so an agent can hand it to a person.
        `viewer_link()` gives the token and the WebSocket URL as well.
        """
        return (await self.viewer_link(view_only=view_only, ttl=ttl)).url

    async def viewer_link(self, *, view_only: bool = False, ttl: float = 3600.0) -> DesktopViewerLink:
        """Mint a viewer token valid `ttl` seconds: the viewer page's URL, the stream's WebSocket URL, the token."""
        request = ports_pb2.CreateDesktopViewerUrlRequest(
            instance_id=self._id, view_only=view_only, ttl=duration(ttl, "ttl")
        )
        reply = await self._t.unary(self._t.viewers.CreateDesktopViewerUrl, request)
        return DesktopViewerLink.from_proto(reply)


# The methods' parameters shadow the request builders' names.
_button = button
_direction = direction
