"""The instance's VNC server: x11vnc on the desktop's X display, which the live desktop viewer streams.

Started on first use (the first `OpenPort` with `desktop` set) and again on the next use after it
died; one server for every viewer (`-shared -forever`), so several browsers watch one screen and
each costs the server one more client, not one more screen poller.

Where it listens, and why that is safe without a password: `-localhost` binds 127.0.0.1 of the
instance only. Every local sandbox has a network namespace of its own (bubblewrap
`--unshare-all`, whether or not it has the internet: instance_svc/runtime/local/bwrap.py) and a
VM's loopback is the VM's, so neither another instance nor the host network can reach the port;
only the agent dials it, for the gateway, which admits the viewer (key or signed viewer token) and
drops a view-only viewer's input before it reaches the server. A process of the tenant inside the
instance can connect too, but it can drive its own display with xdotool anyway. (x11vnc's
`-unixsock` would avoid the port entirely, but needs a patched libvncserver.) `-autoport` takes
the first free port from 5900 up, so a tenant's own server on 5900 is left alone; the port is read
from x11vnc's `PORT=` line. `-norc`, `-noremote` and `-nocmds`: no ~/.x11vncrc of the tenant
changes its options, no X property remote-controls it, it never runs a command.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shutil

import grpc

from cyberdesk_common.status import RpcError, failed_precondition
from guest_agent.identity import Identity

_log = logging.getLogger("guest_agent.vnc")

FIRST_PORT = 5900
START_TIMEOUT = 15.0
# Poll the screen every 10 ms and send a change after at most 10 ms (x11vnc's defaults are 20
# and 20), and never "nap": by default x11vnc polls ever more slowly while no viewer sends input,
# so a watched screen lagged 1.5 to 2.5 s behind (bench/desktop_stream.py). It polls only while a
# viewer is connected.
_TUNING = ("-wait", "10", "-defer", "10", "-nonap")
_NO_DESKTOP = "this instance has no desktop; create it with desktop enabled"


def x11vnc_argv(display: str) -> list[str]:
    """The command line of the instance's VNC server on `display`."""
    return [
        "x11vnc",
        "-display",
        display,
        "-localhost",
        "-noipv6",
        "-autoport",
        str(FIRST_PORT),
        "-shared",
        "-forever",
        "-nopw",
        "-norc",
        "-noremote",
        "-nocmds",
        "-nolookup",
        "-noxrecord",
        "-quiet",
        *_TUNING,
    ]


class VncServer:
    """x11vnc for the agent's display: `port()` starts it when it is not running and says where it listens."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self._proc: asyncio.subprocess.Process | None = None
        self._port = 0
        self._lock = asyncio.Lock()
        self._output: collections.deque[str] = collections.deque(maxlen=20)
        self._drain: asyncio.Task[None] | None = None

    async def port(self) -> int:
        """The loopback port of the running server, started first when needed (FAILED_PRECONDITION if it cannot)."""
        display = self._identity.display
        if not display:
            raise failed_precondition(_NO_DESKTOP)
        async with self._lock:
            if self._proc is not None and self._proc.returncode is None and self._port:
                return self._port
            if self._proc is not None:
                _log.info("the VNC server ended; starting it again", extra={"returncode": self._proc.returncode})
            self._port = await self._start(display)
            return self._port

    async def _start(self, display: str) -> int:
        if shutil.which("x11vnc", path=self._identity.env.get("PATH")) is None:
            raise failed_precondition("x11vnc is not installed in this instance; the live desktop needs it")
        self._output.clear()
        proc = await asyncio.create_subprocess_exec(
            *x11vnc_argv(display),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**self._identity.env, "DISPLAY": display},
        )
        self._proc = proc
        assert proc.stdout is not None
        try:
            port = await asyncio.wait_for(self._ready(proc.stdout), START_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise failed_precondition(
                f"the desktop's VNC server did not start within {START_TIMEOUT:.0f}s{self._last_words()}"
            ) from None
        if port == 0:
            await proc.wait()
            raise failed_precondition(
                f"the desktop's VNC server exited at start (status {proc.returncode}){self._last_words()}"
            )
        # x11vnc keeps writing (clients connecting); a full pipe would stop it, so it is read on.
        self._drain = asyncio.create_task(self._keep_reading(proc.stdout))
        _log.info("VNC server started", extra={"port": port, "pid": proc.pid})
        return port

    async def _ready(self, out: asyncio.StreamReader) -> int:
        """The port of x11vnc's `PORT=` line; 0 when it exited first."""
        while line := await out.readline():
            text = line.decode(errors="replace").strip()
            self._output.append(text)
            if text.startswith("PORT="):
                with contextlib.suppress(ValueError):
                    return int(text[5:])
        return 0

    async def _keep_reading(self, out: asyncio.StreamReader) -> None:
        while line := await out.readline():
            self._output.append(line.decode(errors="replace").strip())

    def _last_words(self) -> str:
        # x11vnc's own lines are about the display inside the instance; no host path is in them.
        lines = [line for line in self._output if line][-3:]
        return ": " + " / ".join(lines) if lines else ""

    async def close(self) -> None:
        """Stop the server (tests; the agent's process group goes with the instance otherwise)."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if self._drain is not None:
            self._drain.cancel()


def unreachable(err: RpcError) -> RpcError:
    """The error of a started server that refused the connection (it died between the check and the dial)."""
    return RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"the desktop's VNC server is not answering ({err.message})")
