"""DesktopService against a real agent and a real Xvfb: screenshots, pointer, typing into a Tk window."""

from __future__ import annotations

import io
import os
import queue
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from cyberdesk_proto.v1 import desktop_pb2 as dt
from cyberdesk_proto.v1 import desktop_pb2_grpc
from tests.guest_agent.integration.conftest import RunningAgent, running_agent

pytestmark = pytest.mark.desktop

# A window with a text entry that reports, one line per event, what it received.
_TK_APP = r"""
import sys, time, tkinter as tk
root = tk.Tk()
root.geometry("600x200+0+0")
entry = tk.Entry(root, width=60)
entry.pack(fill="both", expand=True)
def report(_event=None):
    print("text=" + entry.get().encode("unicode_escape").decode(), flush=True)
entry.bind("<KeyRelease>", lambda e: root.after(1, report))
# 40 ms per key: a window behind its events, as on a busy machine. xdotool alone dropped every
# character off the keyboard map then (it unbinds one before the window looks the key up).
entry.bind("<KeyPress>", lambda e: time.sleep(0.04), add="+")
entry.bind("<Button-1>", lambda e: print(f"click={e.x_root},{e.y_root}", flush=True))
root.after(200, lambda: (entry.focus_force(), print("ready", flush=True)))
root.mainloop()
"""


@pytest.fixture(scope="module")
def xvfb() -> Iterator[str]:
    """A real Xvfb on a free display number (Xvfb picks it: -displayfd)."""
    if shutil.which("Xvfb") is None or shutil.which("xdotool") is None:
        pytest.fail("Xvfb and xdotool are needed; run `make setup`")
    read_end, write_end = os.pipe()
    # -noreset: without it the server resets whenever its last client leaves, refusing connections meanwhile.
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1280x800x24", "-nolisten", "tcp", "-noreset"],
        pass_fds=[write_end],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 20)
        assert ready, "Xvfb did not report its display number"
        number = os.read(read_end, 32).decode().strip()
        assert Path(f"/tmp/.X11-unix/X{number}").exists()
        yield f":{number}"
    finally:
        os.close(read_end)
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def desktop_agent(xvfb: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("desktop-agent"), {"DISPLAY": xvfb}) as agent:
        yield agent


def _stub(agent: RunningAgent) -> desktop_pb2_grpc.DesktopServiceStub:
    return desktop_pb2_grpc.DesktopServiceStub(agent.channel)


def test_display_info_and_screenshots(desktop_agent: RunningAgent, xvfb: str) -> None:
    stub, iid, md = _stub(desktop_agent), desktop_agent.instance_id, desktop_agent.metadata
    info = stub.GetDisplayInfo(dt.GetDisplayInfoRequest(instance_id=iid), metadata=md, timeout=10)
    assert (info.width, info.height, info.display) == (1280, 800, xvfb)

    png = stub.TakeScreenshot(dt.TakeScreenshotRequest(instance_id=iid), metadata=md, timeout=10)
    assert png.format == dt.IMAGE_FORMAT_PNG and (png.width, png.height) == (1280, 800)
    with Image.open(io.BytesIO(png.image)) as image:
        assert (image.format, image.size) == ("PNG", (1280, 800))

    jpeg = stub.TakeScreenshot(
        dt.TakeScreenshotRequest(
            instance_id=iid,
            format=dt.IMAGE_FORMAT_JPEG,
            quality=50,
            region=dt.Region(x=100, y=50, width=400, height=300),
            scale=0.5,
        ),
        metadata=md,
        timeout=10,
    )
    assert (jpeg.format, jpeg.width, jpeg.height) == (dt.IMAGE_FORMAT_JPEG, 200, 150)
    with Image.open(io.BytesIO(jpeg.image)) as image:
        image.load()
        assert (image.format, image.size) == ("JPEG", (200, 150))


def test_screenshot_and_input_validation(desktop_agent: RunningAgent) -> None:
    stub, iid, md = _stub(desktop_agent), desktop_agent.instance_id, desktop_agent.metadata
    bad = [
        (
            stub.TakeScreenshot,
            dt.TakeScreenshotRequest(instance_id=iid, region=dt.Region(x=1000, width=400, height=10)),
            "region",
        ),
        (
            stub.TakeScreenshot,
            dt.TakeScreenshotRequest(instance_id=iid, region=dt.Region(width=0, height=10)),
            "region",
        ),
        (stub.TakeScreenshot, dt.TakeScreenshotRequest(instance_id=iid, scale=1.5), "scale"),
        (stub.TakeScreenshot, dt.TakeScreenshotRequest(instance_id=iid, scale=-0.5), "scale"),
        (stub.TakeScreenshot, dt.TakeScreenshotRequest(instance_id=iid, quality=101), "quality"),
        (stub.MoveMouse, dt.MoveMouseRequest(instance_id=iid), "position is required"),
        (stub.MoveMouse, dt.MoveMouseRequest(instance_id=iid, position=dt.Point(x=1280, y=0)), "outside"),
        (stub.ClickMouse, dt.ClickMouseRequest(instance_id=iid, count=1000), "count"),
        (stub.Scroll, dt.ScrollRequest(instance_id=iid, amount=-1), "amount"),
        (stub.DragMouse, dt.DragMouseRequest(instance_id=iid, start=dt.Point(x=1, y=1)), "start and end"),
        (stub.PressKeys, dt.PressKeysRequest(instance_id=iid, keys=["ctrl+nosuchkey"]), "'nosuchkey'"),
        (stub.PressKeys, dt.PressKeysRequest(instance_id=iid, keys=[]), "keys is empty"),
        (stub.TypeText, dt.TypeTextRequest(instance_id=iid, text="x", delay_ms=-3), "delay_ms"),
    ]
    for method, request, text in bad:
        with pytest.raises(grpc.RpcError) as err:
            method(request, metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.value.details())
        assert text in (err.value.details() or ""), (request, err.value.details())


def test_mouse_moves_then_cursor_position(desktop_agent: RunningAgent) -> None:
    stub, iid, md = _stub(desktop_agent), desktop_agent.instance_id, desktop_agent.metadata
    for x, y in [(10, 20), (1279, 799), (640, 400)]:
        stub.MoveMouse(dt.MoveMouseRequest(instance_id=iid, position=dt.Point(x=x, y=y)), metadata=md, timeout=10)
        position = stub.GetCursorPosition(
            dt.GetCursorPositionRequest(instance_id=iid), metadata=md, timeout=10
        ).position
        assert (position.x, position.y) == (x, y)
    stub.DragMouse(
        dt.DragMouseRequest(instance_id=iid, start=dt.Point(x=5, y=5), end=dt.Point(x=300, y=200)),
        metadata=md,
        timeout=10,
    )
    position = stub.GetCursorPosition(dt.GetCursorPositionRequest(instance_id=iid), metadata=md, timeout=10).position
    assert (position.x, position.y) == (300, 200)
    stub.Scroll(dt.ScrollRequest(instance_id=iid, direction=dt.SCROLL_DIRECTION_UP, amount=3), metadata=md, timeout=10)
    stub.PressMouse(dt.PressMouseRequest(instance_id=iid, button=dt.MOUSE_BUTTON_RIGHT), metadata=md, timeout=10)
    stub.ReleaseMouse(dt.ReleaseMouseRequest(instance_id=iid, button=dt.MOUSE_BUTTON_RIGHT), metadata=md, timeout=10)


class _Lines:
    """Lines a child prints, read by a thread (select on a buffered pipe would miss buffered lines)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._queue: queue.Queue[str] = queue.Queue()
        stdout = proc.stdout
        threading.Thread(target=lambda: [self._queue.put(line.rstrip("\n")) for line in stdout], daemon=True).start()

    def until(self, prefix: str, want: str | None = None, seconds: float = 20) -> str:
        """The next line starting with `prefix` (and equal to `want` when given)."""
        deadline = time.monotonic() + seconds
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            seen.append(line)
            if line.startswith(prefix) and (want is None or line == want):
                return line
        raise AssertionError(f"no {want or prefix!r} from the Tk window; it printed {seen}")


def test_clicks_and_typed_text_arrive_in_a_window(desktop_agent: RunningAgent, xvfb: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _TK_APP], env={**os.environ, "DISPLAY": xvfb}, stdout=subprocess.PIPE, text=True
    )
    lines = _Lines(proc)
    try:
        lines.until("ready")
        stub, iid, md = _stub(desktop_agent), desktop_agent.instance_id, desktop_agent.metadata
        stub.ClickMouse(dt.ClickMouseRequest(instance_id=iid, position=dt.Point(x=50, y=60)), metadata=md, timeout=10)
        assert lines.until("click=") == "click=50,60"
        text = "Hello, wörld ✓ -x"
        stub.TypeText(dt.TypeTextRequest(instance_id=iid, text=text), metadata=md, timeout=30)
        expected = "text=" + text.encode("unicode_escape").decode()
        lines.until("text=", expected)
        # Select all and replace: key combinations reach the window too.
        stub.PressKeys(
            dt.PressKeysRequest(instance_id=iid, keys=["End", "BackSpace", "BackSpace", "é"]), metadata=md, timeout=10
        )
        lines.until("text=", "text=" + (text[:-2] + "é").encode("unicode_escape").decode())
    finally:
        proc.terminate()
        proc.wait(10)


def test_without_a_display_every_call_is_failed_precondition(bound_agent: RunningAgent) -> None:
    stub, iid, md = _stub(bound_agent), bound_agent.instance_id, bound_agent.metadata
    calls = [
        (stub.TakeScreenshot, dt.TakeScreenshotRequest(instance_id=iid)),
        (stub.MoveMouse, dt.MoveMouseRequest(instance_id=iid, position=dt.Point(x=1, y=1))),
        (stub.ClickMouse, dt.ClickMouseRequest(instance_id=iid)),
        (stub.PressMouse, dt.PressMouseRequest(instance_id=iid)),
        (stub.ReleaseMouse, dt.ReleaseMouseRequest(instance_id=iid)),
        (stub.DragMouse, dt.DragMouseRequest(instance_id=iid, start=dt.Point(), end=dt.Point())),
        (stub.Scroll, dt.ScrollRequest(instance_id=iid)),
        (stub.TypeText, dt.TypeTextRequest(instance_id=iid, text="x")),
        (stub.PressKeys, dt.PressKeysRequest(instance_id=iid, keys=["a"])),
        (stub.GetCursorPosition, dt.GetCursorPositionRequest(instance_id=iid)),
        (stub.GetDisplayInfo, dt.GetDisplayInfoRequest(instance_id=iid)),
    ]
    for method, request in calls:
        with pytest.raises(grpc.RpcError) as err:
            method(request, metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (request, err.value.details())
        assert "create it with desktop enabled" in (err.value.details() or "")


def test_a_display_that_does_not_answer_is_failed_precondition(tmp_path: Path) -> None:
    with running_agent(tmp_path, {"DISPLAY": ":4711"}) as agent:
        stub, iid, md = _stub(agent), agent.instance_id, agent.metadata
        for method, request in [
            (stub.TakeScreenshot, dt.TakeScreenshotRequest(instance_id=iid)),
            (stub.GetCursorPosition, dt.GetCursorPositionRequest(instance_id=iid)),
            (stub.MoveMouse, dt.MoveMouseRequest(instance_id=iid, position=dt.Point(x=1, y=1))),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                method(request, metadata=md, timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
            assert ":4711" in (err.value.details() or "")
