"""The live desktop: screen change to browser pixels, stream bytes per second, viewers one gateway holds.

One `cyberdesk up` stack (bench.typescript_sdk._stack: real gateway, instance_svc, a bubblewrap
desktop sandbox with x11vnc) and Debian's chromium through Playwright on the viewer page
(`desk.desktop.stream_url()`: noVNC over the gateway's WebSocket, through the agent's tunnel).

- latency: a small X program inside the instance repaints its window (the whole WIDTHxHEIGHT
  screen) in the next of four colours every BENCH_DESKTOP_PERIOD_MS (default 300) ms and logs the
  wall-clock time right after XSync (the X server has drawn it); the page polls one canvas pixel
  every 2 ms and logs the wall-clock time each new colour appears. Both clocks are this host's
  (a sandbox shares the host's CLOCK_REALTIME). BENCH_DESKTOP_CHANGES (default 60) changes, p50/p99.
  What it includes: x11vnc noticing the change (its poll, -wait/-defer 10 ms), encoding, the
  agent's tunnel, the gateway's relay and RFB parse, noVNC decoding and drawing, and the poll.
- bytes per second received by the browser (WebSocket frames), for BENCH_DESKTOP_SECONDS (default
  5) s each: a static screen (nothing changes), and a busy one (every 50 ms, 400 rectangles of
  16x16 in random colours: incompressible, like video); with the CPU share x11vnc used meanwhile.
- viewers held: N raw RFB clients (tests.desktop_stream._rfb_client, one thread each) connected
  at once for N in BENCH_DESKTOP_VIEWERS (default 1,8,32,64); per N the time to connect them all
  and how many of them receive a full framebuffer update after the screen changes, within 10 s.

    .venv/bin/python -m bench.desktop_stream
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench._report import latency_summary, report
from bench.typescript_sdk import _stack
from cyberdesk_stack.browser import launch_chromium

WIDTH, HEIGHT = 1024, 768
CHANGES = int(os.environ.get("BENCH_DESKTOP_CHANGES", "60"))
PERIOD_MS = int(os.environ.get("BENCH_DESKTOP_PERIOD_MS", "300"))
SECONDS = float(os.environ.get("BENCH_DESKTOP_SECONDS", "5"))
VIEWERS = [int(n) for n in os.environ.get("BENCH_DESKTOP_VIEWERS", "1,8,32,64").split(",")]
PALETTE = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0)]

# Inside the instance: `paint.py MODE LOG`. MODE "cycle": the palette in turn every PERIOD_MS ms,
# CHANGES times, each change's wall-clock time logged after XSync; "busy": random rectangles;
# "still": one colour, then nothing.
PAINTER = r"""
import ctypes, json, random, sys, time
mode, log = sys.argv[1], sys.argv[2]
period, changes, palette = float(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
x = ctypes.CDLL("libX11.so.6")
x.XOpenDisplay.restype = ctypes.c_void_p
vp, ul, i, u = ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_uint
x.XDefaultRootWindow.restype = ul; x.XDefaultRootWindow.argtypes = [vp]
x.XCreateSimpleWindow.restype = ul
x.XCreateSimpleWindow.argtypes = [vp, ul, i, i, u, u, u, ul, ul]
x.XMapWindow.argtypes = [vp, ul]; x.XSync.argtypes = [vp, i]
x.XCreateGC.restype = vp; x.XCreateGC.argtypes = [vp, ul, ul, vp]
x.XSetForeground.argtypes = [vp, vp, ul]
x.XFillRectangle.argtypes = [vp, ul, vp, i, i, u, u]
d = x.XOpenDisplay(None)
w = x.XCreateSimpleWindow(d, x.XDefaultRootWindow(d), 0, 0, 4000, 4000, 0, 0, 0)
x.XMapWindow(d, w)
gc = x.XCreateGC(d, w, 0, None)
x.XSync(d, 0)
time.sleep(1)
def fill(rgb, rx=0, ry=0, rw=4000, rh=4000):
    x.XSetForeground(d, gc, (rgb[0] << 16) | (rgb[1] << 8) | rgb[2])
    x.XFillRectangle(d, w, gc, rx, ry, rw, rh)
out = open(log, "w")
if mode == "still":
    fill((40, 40, 40)); x.XSync(d, 0); out.write("ready\n"); out.flush(); time.sleep(3600)
elif mode == "busy":
    out.write("ready\n"); out.flush()
    while True:
        for _ in range(400):
            fill([random.randrange(256) for _ in range(3)], random.randrange(1024), random.randrange(768), 16, 16)
        x.XSync(d, 0)
        time.sleep(0.05)
else:
    for n in range(changes):
        time.sleep(period)
        fill(palette[n % len(palette)]); x.XSync(d, 0)
        out.write(json.dumps([n, time.time() * 1000]) + "\n"); out.flush()
    out.write("done\n"); out.flush()
    time.sleep(3600)
"""

# In the page: the wall-clock time each palette colour first appears at the centre pixel.
WATCH = """([palette, x, y]) => {
  window.benchSeen = [];
  const canvas = document.querySelector('#screen canvas');
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  let last = -1;
  setInterval(() => {
    const p = ctx.getImageData(x, y, 1, 1).data;
    const near = (c) => Math.abs(c[0] - p[0]) < 40 && Math.abs(c[1] - p[1]) < 40 && Math.abs(c[2] - p[2]) < 40;
    const at = palette.findIndex(near);
    if (at >= 0 && at !== last) { window.benchSeen.push([at, Date.now()]); last = at; }
  }, 2);
}"""


def _painter(box: Any, mode: str, log: str) -> Any:
    args = [mode, log, str(PERIOD_MS / 1000), str(CHANGES), json.dumps(PALETTE)]
    return box.start(["/usr/bin/python3", "/tmp/paint.py", *args], tag=f"paint-{mode}")


def _wait_file(box: Any, path: str, text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            content: str = box.files.read(path).decode()
            if text in content:
                return content
        except Exception:  # not written yet
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{path} never said {text!r}")


def _latency(box: Any, browser: Any) -> dict[str, Any]:
    page = browser.new_page(viewport={"width": 1100, "height": 850})
    page.goto(box.desktop.stream_url())
    page.wait_for_function("() => window.cyberdeskViewer && window.cyberdeskViewer.connected", timeout=60_000)
    page.evaluate(WATCH, [PALETTE, WIDTH // 2, HEIGHT // 2])
    proc = _painter(box, "cycle", "/tmp/cycle.log")
    lines = _wait_file(box, "/tmp/cycle.log", "done", timeout=CHANGES * PERIOD_MS / 1000 + 120).splitlines()
    time.sleep(1)  # the last change's pixels
    seen = page.evaluate("() => window.benchSeen")
    page.close()
    proc.kill()
    painted = [json.loads(line) for line in lines if line.startswith("[")]
    # The n-th change is palette[n % 4]: its sighting is the first of that colour after it was
    # painted (5 ms of slack for the two clocks' readings) and before the colour comes round again.
    samples: list[float] = []
    for n, at in painted:
        colour = n % len(PALETTE)
        cycle = len(PALETTE) * PERIOD_MS
        found = next((when for index, when in seen if index == colour and at - 5 <= when < at + cycle), None)
        if found is not None:
            samples.append(found - at)
    missed = len(painted) - len(samples)
    summary = latency_summary(samples) if samples else {}
    return {"changes": len(painted), "seen": len(samples), "missed": missed, **summary}


def _x11vnc_cpu_seconds(box: Any) -> float:
    """CPU time (user + system) of the instance's x11vnc so far, from its /proc stat (100 ticks a second)."""
    out = box.exec(["/bin/sh", "-c", "cat /proc/$(pgrep -x x11vnc | head -n1)/stat"]).stdout_text
    fields = out[out.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bytes_per_second(box: Any, browser: Any, mode: str) -> tuple[float, float]:
    proc = _painter(box, mode, f"/tmp/{mode}.log")
    _wait_file(box, f"/tmp/{mode}.log", "ready")
    page = browser.new_page(viewport={"width": 1100, "height": 850})
    received = [0]
    counting = threading.Event()

    def on_socket(ws: Any) -> None:
        def on_frame(payload: Any) -> None:
            if counting.is_set():
                received[0] += len(payload)

        ws.on("framereceived", on_frame)

    page.on("websocket", on_socket)
    page.goto(box.desktop.stream_url(view_only=True))
    page.wait_for_function("() => window.cyberdeskViewer && window.cyberdeskViewer.connected", timeout=60_000)
    page.wait_for_timeout(2000)  # the first full frame is not the steady state
    cpu = _x11vnc_cpu_seconds(box)
    counting.set()
    start = time.monotonic()
    page.wait_for_timeout(SECONDS * 1000)  # Playwright delivers frame events while it waits
    elapsed = time.monotonic() - start
    counting.clear()
    cpu = _x11vnc_cpu_seconds(box) - cpu
    page.close()
    proc.kill()
    return received[0] / elapsed, 100 * cpu / elapsed


def _viewers(box: Any, n: int) -> dict[str, Any]:
    from tests.desktop_stream._rfb_client import RfbClient

    link = box.desktop.viewer_link(view_only=True)
    protocols = ["binary", f"cyberdesk.viewer.{link.token}"]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=min(n, 32)) as pool:
        clients = list(pool.map(lambda _: RfbClient.open(link.stream_url, protocols), range(n)))
        connected = time.monotonic() - start
        try:
            # Every viewer asks for the full screen (raw pixels: the heaviest case for the relay).
            def full(client: RfbClient) -> bool:
                return len(client.update(0, 0, client.width, client.height)) == client.width * client.height * 4

            start = time.monotonic()
            served = sum(pool.map(full, clients))
            updated = time.monotonic() - start
        finally:
            for client in clients:
                client.close()
    return {
        "viewers": n,
        "connect_all_s": round(connected, 2),
        "full_frame_all_s": round(updated, 2),
        "served": served,
    }


def main() -> None:
    from playwright.sync_api import sync_playwright

    from cyberdesk import Cyberdesk

    with (
        tempfile.TemporaryDirectory(prefix="bench-desktop-") as tmp,
        _stack(Path(tmp)) as config,
        Cyberdesk(api_key=config["api_key"], endpoint=config["endpoint"]) as client,
    ):
        box = client.instances.create(desktop=True, width=WIDTH, height=HEIGHT, timeout=1800)
        try:
            box.files.write("/tmp/paint.py", PAINTER)
            with sync_playwright() as p:
                browser = launch_chromium(p)
                try:
                    latency = _latency(box, browser)
                    static, static_cpu = _bytes_per_second(box, browser, "still")
                    busy, busy_cpu = _bytes_per_second(box, browser, "busy")
                finally:
                    browser.close()
            held = [_viewers(box, n) for n in VIEWERS]
        finally:
            box.delete()
    rows = [
        {
            "measure": "screen change -> canvas pixels",
            "value": f"p50 {latency.get('p50_ms')} ms, p99 {latency.get('p99_ms')} ms",
            "n": f"{latency['seen']}/{latency['changes']}",
        },
        {
            "measure": "bytes/s, static screen",
            "value": f"{static:,.0f} (x11vnc {static_cpu:.0f}% CPU)",
            "n": f"{SECONDS:g} s",
        },
        {
            "measure": "bytes/s, busy screen",
            "value": f"{busy:,.0f} (x11vnc {busy_cpu:.0f}% CPU)",
            "n": f"{SECONDS:g} s",
        },
        *(
            {
                "measure": f"{h['viewers']} viewers held",
                "value": f"connected in {h['connect_all_s']} s, full frame to all in {h['full_frame_all_s']} s",
                "n": f"{h['served']}/{h['viewers']} served",
            }
            for h in held
        ),
    ]
    report(
        "desktop_stream",
        rows,
        screen=f"{WIDTH}x{HEIGHT}",
        latency=latency,
        bytes_per_second={"static": round(static), "busy": round(busy)},
        x11vnc_cpu_percent={"static": round(static_cpu, 1), "busy": round(busy_cpu, 1)},
        viewers=held,
        period_ms=PERIOD_MS,
    )


if __name__ == "__main__":
    main()
