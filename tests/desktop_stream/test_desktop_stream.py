"""The live desktop end to end: `cyberdesk up`, a real desktop sandbox with real x11vnc, Debian's chromium.

One stack and one desktop instance for the module. A small X program inside the instance paints
its window a known colour; the noVNC canvas in the browser must show the same pixels as a
screenshot taken through the API, a click in the canvas must move the instance's pointer there,
and the gateway must refuse who may not watch and drop what a view-only viewer sends.

Screenshots of the viewer pages are saved under `artifacts/desktop_stream/` in the checkout
(ignored by git).
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops
from playwright.sync_api import Browser, Page, sync_playwright
from websockets.exceptions import ConnectionClosed, InvalidStatus

from cyberdesk import Cyberdesk, FailedPrecondition, Instance, NotFound
from cyberdesk_stack.browser import launch_chromium
from tests.cli.stack import CLI, RunningStack, running_stack
from tests.desktop_stream._rfb_client import RfbClient
from tests.support.procs import ROOT

pytestmark = [pytest.mark.sandbox, pytest.mark.desktop, pytest.mark.timeout(300)]

ARTIFACTS = ROOT / "artifacts" / "desktop_stream"
WIDTH, HEIGHT = 640, 400
COLOUR = (255, 128, 0)
# A window of one colour, mapped and kept (python3 and libX11 of the instance; no toolkit needed).
PAINT = r"""
import ctypes, sys, time
x = ctypes.CDLL("libX11.so.6")
x.XOpenDisplay.restype = ctypes.c_void_p
x.XDefaultRootWindow.restype = ctypes.c_ulong
x.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
x.XCreateSimpleWindow.restype = ctypes.c_ulong
ints, uints, ulongs = [ctypes.c_int] * 2, [ctypes.c_uint] * 3, [ctypes.c_ulong] * 2
x.XCreateSimpleWindow.argtypes = [ctypes.c_void_p, ctypes.c_ulong] + ints + uints + ulongs
x.XMapWindow.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
x.XFlush.argtypes = [ctypes.c_void_p]
d = x.XOpenDisplay(None)
w = x.XCreateSimpleWindow(d, x.XDefaultRootWindow(d), 0, 0, 2000, 2000, 0, 0, int(sys.argv[1], 16))
x.XSelectInput.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_long]
x.XSelectInput(d, w, 1 | 4)  # KeyPressMask | ButtonPressMask
x.XMapWindow(d, w)
x.XFlush(d)
print("painted", flush=True)
# Every key typed into the window, as text, to a file the test reads (clicks focus the window).
x.XNextEvent.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
x.XLookupString.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
x.XSetInputFocus.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_ulong]
event, text, log = ctypes.create_string_buffer(192), ctypes.create_string_buffer(8), open("/tmp/keys.log", "a")
while True:
    x.XNextEvent(d, event)
    kind = ctypes.c_int.from_buffer(event).value
    if kind == 4:  # ButtonPress
        x.XSetInputFocus(d, w, 1, 0)
        x.XFlush(d)
    elif kind == 2:  # KeyPress
        n = x.XLookupString(event, text, 8, None, None)
        log.write(text.raw[:n].decode(errors="replace"))
        log.flush()
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    # Revoked keys' streams end within the auth cache's TTL: one second here; three viewers at most.
    extra = {"CYBERDESK_AUTH_CACHE_SECONDS": "1", "CYBERDESK_DESKTOP_MAX_VIEWERS": "3"}
    with running_stack(tmp_path_factory.mktemp("desktop-stack"), extra) as running:
        yield running


@pytest.fixture(scope="module")
def http(stack: RunningStack) -> str:
    return stack.env_config()["http_endpoint"]


@pytest.fixture(scope="module")
def client(stack: RunningStack) -> Iterator[Cyberdesk]:
    config = stack.env_config()
    with Cyberdesk(api_key=config["api_key"], endpoint=config["endpoint"]) as c:
        yield c


@pytest.fixture(scope="module")
def desk(client: Cyberdesk) -> Iterator[Instance]:
    instance = client.instances.create(desktop=True, width=WIDTH, height=HEIGHT, timeout=600)
    try:
        instance.files.write("/tmp/paint.py", PAINT)
        instance.start(["/usr/bin/python3", "/tmp/paint.py", "".join(f"{c:02x}" for c in COLOUR)], tag="paint")
        yield instance
    finally:
        instance.delete()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = launch_chromium(p)
        try:
            yield b
        finally:
            b.close()


def _wait(predicate: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _screen_colour(desk: Instance) -> bool:
    shot = Image.open(io.BytesIO(desk.desktop.screenshot().image)).convert("RGB")
    return shot.getpixel((WIDTH // 2, HEIGHT // 2)) == COLOUR


def _read(desk: Instance, path: str) -> str:
    try:
        return desk.files.read(path).decode()
    except NotFound:
        return ""


def _canvas(page: Page) -> Image.Image:
    data_url = page.evaluate("() => document.querySelector('#screen canvas').toDataURL('image/png')")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")


def _open_viewer(browser: Browser, url: str) -> Page:
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(url)
    page.wait_for_function("() => window.cyberdeskViewer && window.cyberdeskViewer.connected", timeout=30_000)
    return page


def _close_to(a: tuple[int, ...], b: tuple[int, ...], tolerance: int = 24) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def test_the_canvas_shows_the_screen_and_a_click_moves_the_pointer(desk: Instance, browser: Browser) -> None:
    _wait(lambda: _screen_colour(desk), "the painted window on the screen")
    url = desk.desktop.stream_url()
    assert "#token=" in url
    page = _open_viewer(browser, url)
    try:
        centre = (WIDTH // 2, HEIGHT // 2)
        _wait(lambda: _close_to(_canvas(page).getpixel(centre), COLOUR), "the colour in the canvas")
        canvas = _canvas(page)
        shot = Image.open(io.BytesIO(desk.desktop.screenshot().image)).convert("RGB")
        assert canvas.size == shot.size == (WIDTH, HEIGHT)
        # The stream may encode lossily (tight/JPEG): compare per pixel with a tolerance.
        diff = ImageChops.difference(canvas, shot).tobytes()
        differing = sum(1 for i in range(0, len(diff), 3) if max(diff[i : i + 3]) > 24)
        assert differing <= WIDTH * HEIGHT // 100, f"{differing} pixels differ between the canvas and the screenshot"
        page.screenshot(path=str(ARTIFACTS / "viewer-control.png"))
        canvas.save(ARTIFACTS / "canvas.png")
        shot.save(ARTIFACTS / "api-screenshot.png")

        # A click at instance pixel (123, 77): the canvas is scaled to the page, so map through its box.
        box = page.locator("#screen canvas").bounding_box()
        assert box is not None
        target = (123, 77)
        scale_x, scale_y = box["width"] / WIDTH, box["height"] / HEIGHT
        page.mouse.click(box["x"] + (target[0] + 0.5) * scale_x, box["y"] + (target[1] + 0.5) * scale_y)
        _wait(lambda: _close_to(desk.desktop.cursor(), target, 1), f"the pointer at {target}")
        # Keys typed into the page reach the window inside (the click focused it).
        page.keyboard.type("hi there")
        _wait(lambda: _read(desk, "/tmp/keys.log").endswith("hi there"), "the typed text in the window")
    finally:
        page.close()


def test_two_viewers_at_once_one_view_only(desk: Instance, browser: Browser) -> None:
    _wait(lambda: _screen_colour(desk), "the painted window on the screen")
    control = _open_viewer(browser, desk.desktop.stream_url())
    watcher = _open_viewer(browser, desk.desktop.stream_url(view_only=True))
    try:
        centre = (WIDTH // 2, HEIGHT // 2)
        for page in (control, watcher):
            _wait(lambda page=page: _close_to(_canvas(page).getpixel(centre), COLOUR), "the colour in both canvases")
        assert watcher.evaluate("() => document.getElementById('mode').textContent") == "view only"
        watcher.screenshot(path=str(ARTIFACTS / "viewer-view-only.png"))
        # Both stay connected while the other one is open (x11vnc -shared; ClientInit made shared).
        assert control.evaluate("() => window.cyberdeskViewer.connected")
        assert watcher.evaluate("() => window.cyberdeskViewer.connected")
    finally:
        control.close()
        watcher.close()


def test_the_page_reconnects_after_the_vnc_server_is_killed(desk: Instance, browser: Browser) -> None:
    """A tenant can kill x11vnc (same uid): the page's stream ends, it reconnects, the agent starts a new one."""
    page = _open_viewer(browser, desk.desktop.stream_url())
    try:
        before = desk.exec(["pgrep", "-x", "x11vnc"]).stdout_text.split()
        assert len(before) == 1
        desk.exec(["kill", "-9", before[0]])
        page.wait_for_function("() => window.cyberdeskViewer.disconnects >= 1", timeout=30_000)
        page.wait_for_function("() => window.cyberdeskViewer.connected", timeout=30_000)
        after = desk.exec(["pgrep", "-x", "x11vnc"]).stdout_text.split()
        assert len(after) == 1 and after != before
        centre = (WIDTH // 2, HEIGHT // 2)
        _wait(lambda: _close_to(_canvas(page).getpixel(centre), COLOUR), "the colour after the reconnect")
    finally:
        page.close()


def test_view_only_input_is_dropped_by_the_gateway(desk: Instance) -> None:
    """A client that ignores the view-only mode (not noVNC) still cannot move the pointer or type."""
    drive = desk.desktop.viewer_link(view_only=False)
    driver = RfbClient.open(drive.stream_url, ["binary", f"cyberdesk.viewer.{drive.token}"])
    watch = desk.desktop.viewer_link(view_only=True)
    viewer = RfbClient.open(watch.stream_url, ["binary", f"cyberdesk.viewer.{watch.token}"])
    try:
        driver.pointer(10, 10, buttons=1)  # a click: the window inside takes the keyboard focus
        driver.pointer(10, 10, buttons=0)
        driver.update()
        assert desk.desktop.cursor() == (10, 10)
        typed = len(_read(desk, "/tmp/keys.log"))
        viewer.pointer(300, 200)
        viewer.key(ord("z"), True)
        viewer.key(ord("z"), False)
        viewer.update()  # answered after the server handled (or never got) the events before it
        assert desk.desktop.cursor() == (10, 10)
        # The same bytes from the control viewer do act: the checks can fail. X delivers input in
        # the order it was injected, so once the window has the "y" it would have had the "z".
        driver.pointer(300, 200)
        driver.key(ord("y"), True)
        driver.key(ord("y"), False)
        driver.update()
        assert desk.desktop.cursor() == (300, 200)
        _wait(lambda: _read(desk, "/tmp/keys.log")[typed:].endswith("y"), "the control viewer's key")
        assert _read(desk, "/tmp/keys.log")[typed:] == "y"
    finally:
        viewer.close()
        driver.close()


def test_refused_without_access(desk: Instance, client: Cyberdesk, stack: RunningStack, http: str) -> None:
    link = desk.desktop.viewer_link(ttl=1)
    stream = link.stream_url
    with pytest.raises(InvalidStatus) as nothing:
        RfbClient.open(stream, ["binary"])
    assert nothing.value.response.status_code == 401
    # A forged token (the payload changed, MAC kept) and a token for another instance.
    payload, mac = link.token.split(".")
    forged = base64.urlsafe_b64encode(
        json.dumps({**json.loads(base64.urlsafe_b64decode(payload + "==")), "v": False}).encode()
    ).rstrip(b"=")
    with pytest.raises(InvalidStatus) as bad:
        RfbClient.open(stream, ["binary", f"cyberdesk.viewer.{forged.decode()}.{mac}"])
    assert bad.value.response.status_code == 401
    other_stream = stream.replace(desk.id, "i-000000000000")
    with pytest.raises(InvalidStatus) as elsewhere:
        RfbClient.open(other_stream, ["binary", f"cyberdesk.viewer.{link.token}"])
    assert elsewhere.value.response.status_code == 401
    # Expired: wait out the one-second link.
    assert link.expire_time is not None
    _wait(lambda: time.time() > link.expire_time.timestamp() + 0.05, "the link's expiry", 5)  # type: ignore[union-attr]
    with pytest.raises(InvalidStatus) as expired:
        RfbClient.open(stream, ["binary", f"cyberdesk.viewer.{link.token}"])
    assert expired.value.response.status_code == 401
    assert b"expired" in expired.value.response.body

    # Another tenant: its key sees no such instance, to mint a link or to stream.
    _, other_key = client.keys.create("tenant-other", "other")
    with Cyberdesk(api_key=other_key, endpoint=stack.env_config()["endpoint"]) as other, pytest.raises(NotFound):
        other.instances.handle(desk.id).desktop.stream_url()
    with pytest.raises(InvalidStatus) as foreign:
        RfbClient.open(stream, ["binary", f"cyberdesk.key.{other_key}"])
    assert foreign.value.response.status_code == 404

    # A stale console session cookie beside a valid token does not refuse the link.
    fresh = desk.desktop.viewer_link()
    with_cookie = RfbClient.open(
        stream, ["binary", f"cyberdesk.viewer.{fresh.token}"], headers={"cookie": "cyberdesk_session=ended"}
    )
    with_cookie.close()

    # The tenant's own key opens it directly (subprotocol, as the WebSocket shell takes it).
    own = RfbClient.open(stream, ["binary", f"cyberdesk.key.{stack.env_config()['api_key']}"])
    assert (own.width, own.height) == (WIDTH, HEIGHT)
    own.close()


def test_an_instance_without_desktop_has_no_viewer(client: Cyberdesk) -> None:
    box = client.instances.create(timeout=120)
    try:
        with pytest.raises(FailedPrecondition):
            box.desktop.stream_url()
    finally:
        box.delete()


def test_the_page_is_served_with_a_policy(http: str, desk: Instance) -> None:
    import httpx

    page = httpx.get(f"{http}/desktop/{desk.id}")
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'self'" in policy
    assert page.headers["cache-control"] == "no-cache"
    again = httpx.get(f"{http}/desktop/{desk.id}", headers={"if-none-match": page.headers["etag"]})
    assert again.status_code == 304
    script = httpx.get(f"{http}/desktop/static/viewer.js").text
    module = script.split('from "', 1)[1].split('"', 1)[0]
    rfb = httpx.get(f"{http}{module}")
    assert rfb.status_code == 200 and "immutable" in rfb.headers["cache-control"]
    assert httpx.get(f"{http}/desktop/static/novnc/1.7.0/../../../../pyproject.toml").status_code == 404


def test_a_revoked_key_ends_its_stream(desk: Instance, client: Cyberdesk, stack: RunningStack) -> None:
    tenant = stack.env_config()["tenant"]
    key, secret = client.keys.create(tenant, "viewer")
    viewer = RfbClient.open(desk.desktop.viewer_link().stream_url, ["binary", f"cyberdesk.key.{secret}"])
    try:
        viewer.update()
        client.keys.revoke(key.key_id)
        with pytest.raises(ConnectionClosed) as ended:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                viewer.update(incremental=True)
        assert ended.value.rcvd is not None and ended.value.rcvd.code == 4016  # 4000 + UNAUTHENTICATED
    finally:
        viewer.close()


def test_what_is_not_rfb_ends_the_stream(desk: Instance) -> None:
    link = desk.desktop.viewer_link()
    viewer = RfbClient.open(link.stream_url, ["binary", f"cyberdesk.viewer.{link.token}"])
    try:
        viewer.ws.send(b"\x07garbage")
        with pytest.raises(ConnectionClosed) as ended:
            viewer.update()
        assert ended.value.rcvd is not None and ended.value.rcvd.code == 1008
        assert "message type 7" in ended.value.rcvd.reason
    finally:
        viewer.close()
    texting = RfbClient.open(link.stream_url, ["binary", f"cyberdesk.viewer.{link.token}"])
    try:
        texting.ws.send("not binary")
        with pytest.raises(ConnectionClosed) as ended:
            texting.update()
        assert ended.value.rcvd is not None and ended.value.rcvd.code == 1003
    finally:
        texting.close()


def test_cli_view_opens_or_prints_the_link(stack: RunningStack, desk: Instance, tmp_path: Path) -> None:
    printed = stack.cli("view", desk.id, "--view-only", "--print")
    assert printed.returncode == 0, printed.stderr
    url = printed.stdout.decode().strip()
    assert f"/desktop/{desk.id}#token=" in url
    claims = json.loads(base64.urlsafe_b64decode(url.split("#token=")[1].split(".")[0] + "=="))
    assert claims["v"] is True and claims["i"] == desk.id
    # Without --print it opens a browser: webbrowser runs $BROWSER with the URL.
    opened = tmp_path / "opened"
    recorder = tmp_path / "browser"
    recorder.write_text(f'#!/bin/sh\nprintf %s "$1" > {opened}\n')
    recorder.chmod(0o755)
    env = {**stack.env, "BROWSER": str(recorder)}  # one executable: webbrowser runs it with the URL
    run = subprocess.run([CLI, "view", desk.id], env=env, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"/desktop/{desk.id}#token=" in opened.read_text()
    assert b"opened the viewer" in run.stderr
    as_json = json.loads(stack.cli("view", desk.id, "--json").stdout)
    assert as_json["stream_url"].endswith(f"/v1/instances/{desk.id}/desktop:stream") and not as_json["view_only"]
    missing = stack.cli("view", "i-000000000000", "--print")
    assert missing.returncode != 0
    assert b"i-000000000000" in missing.stderr and b"Traceback" not in missing.stderr


def test_no_token_or_key_in_the_logs(stack: RunningStack, desk: Instance) -> None:
    """Every token and key the tests before it used is absent from every log of the stack."""
    link = desk.desktop.viewer_link()
    viewer = RfbClient.open(link.stream_url, ["binary", f"cyberdesk.viewer.{link.token}"])
    viewer.update()
    viewer.close()
    logs = b"".join(p.read_bytes() for p in (stack.state_dir / "logs").glob("*") if p.is_file())
    assert b"desktop viewer connected" in logs
    payload, mac = link.token.split(".")
    assert mac.encode() not in logs and payload.encode() not in logs
    assert stack.env_config()["api_key"].encode() not in logs


def test_viewers_of_one_instance_are_bounded(desk: Instance) -> None:
    link = desk.desktop.viewer_link(view_only=True)
    protocols = ["binary", f"cyberdesk.viewer.{link.token}"]
    viewers = [RfbClient.open(link.stream_url, protocols) for _ in range(3)]
    try:
        with pytest.raises(InvalidStatus) as full:
            RfbClient.open(link.stream_url, protocols)
        assert full.value.response.status_code == 429
        assert b"3 viewers already" in full.value.response.body
        viewers.pop().close()
        # The place is free again once the gateway saw the close (it reads it asynchronously).
        again = _wait(lambda: _try_open(link.stream_url, protocols), "a free viewer place", 10)
        viewers.append(again)
    finally:
        for viewer in viewers:
            viewer.close()


def _try_open(url: str, protocols: list[str]) -> RfbClient | None:
    try:
        return RfbClient.open(url, protocols)
    except InvalidStatus:
        return None
