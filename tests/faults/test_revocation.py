"""Revoking a key ends the calls it has open, within the bound that applies to new calls.

Real gateway, instance_svc and sandboxes. One key holds four streams open: a gRPC WatchInstances
(the SDK's watch), a gRPC exec stream, a REST NDJSON watch and a WebSocket shell. The operator
revokes the key with `python -m gateway_svc keys revoke` (straight into the key store, as a user
does it; the gateway is not told). Every stream must end with UNAUTHENTICATED within the
documented bound (CYBERDESK_AUTH_CACHE_SECONDS, the default 5 s here; the wait below is a
generous 30 s), and a key of another tenant keeps its stream.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable

import httpx
import pytest
import websockets

from cyberdesk import Cyberdesk, Unauthenticated
from cyberdesk._models import Stdout
from tests.faults.stack import Stack

TENANT = "t-revoke"

pytestmark = pytest.mark.timeout(150)

BOUND_WAIT = 30.0  # generous: the documented bound is 5 s


def _in_thread(body: Callable[[], object]) -> tuple[threading.Thread, list[object], threading.Event]:
    """Run `body` in a thread; its result or exception lands in the list; the event is set once it started."""
    out: list[object] = []
    started = threading.Event()

    def run() -> None:
        try:
            out.append(body())
        except BaseException as err:
            out.append(err)
        finally:
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    return thread, out, started


def test_revoking_a_key_ends_its_grpc_rest_and_websocket_streams(stack: Stack) -> None:
    key_id, key = stack.gateway.new_key(TENANT)
    _, other_key = stack.gateway.new_key("t-other")
    client = Cyberdesk(api_key=key, endpoint=stack.gateway.addr)
    other = Cyberdesk(api_key=other_key, endpoint=stack.gateway.addr)
    box = client.instances.create(timeout=120)
    ready = {name: threading.Event() for name in ("exec", "rest", "ws")}

    watch = client.instances.watch()
    others_watch = other.instances.watch()

    def watching() -> object:
        for _ in watch:
            pass
        return "the watch ended without an error"

    def executing() -> object:
        for event in box.exec_stream("echo up; sleep 100"):
            if isinstance(event, Stdout):
                ready["exec"].set()
        return "the exec stream ended without an error"

    def rest_watching() -> object:
        url = f"http://{stack.gateway.http}/v1/instances:watch"
        with httpx.stream("GET", url, headers={"x-api-key": key}, timeout=None) as response:
            assert response.status_code == 200
            ready["rest"].set()
            for line in response.iter_lines():
                if '"error"' in line:
                    return json.loads(line)["error"]
        return "the REST watch ended without an error item"

    def shell() -> object:
        async def scenario() -> object:
            url = f"ws://{stack.gateway.http}/v1/instances/{box.id}/pty"
            async with websockets.connect(url, additional_headers={"x-api-key": key}) as ws:
                await ws.send(json.dumps({"type": "open", "cols": 80, "rows": 24, "argv": ["/bin/sh"]}))
                ready["ws"].set()
                frames: list[object] = []
                try:
                    while True:
                        frame = await ws.recv()
                        if isinstance(frame, str):
                            frames.append(json.loads(frame))
                except websockets.ConnectionClosed:
                    return ws.close_code, [f for f in frames if isinstance(f, dict) and f.get("type") == "error"]

        return asyncio.run(scenario())

    runs = {
        name: _in_thread(body)
        for name, body in (("watch", watching), ("exec", executing), ("rest", rest_watching), ("ws", shell))
    }
    try:
        for thread, _, _ in runs.values():
            thread.start()
        for name in ("exec", "ws"):
            assert ready[name].wait(60), f"the {name} stream never started"
        # A REST stream sends its headers with its first item: give the watches changes to report
        # until it has (the GET may not have reached the gateway at the first one).
        for _ in range(30):
            box.pause()
            box.resume()
            if ready["rest"].wait(2):
                break
        assert ready["rest"].is_set(), f"the REST watch never started: {runs['rest'][1]}"

        stack.gateway.keys("revoke", "--key-id", key_id)

        for name, (thread, _, _) in runs.items():
            thread.join(BOUND_WAIT)
            assert not thread.is_alive(), f"the {name} stream was still open {BOUND_WAIT} s after the revocation"
        results = {name: out[0] for name, (_, out, _) in runs.items()}
        for name in ("watch", "exec"):
            assert isinstance(results[name], Unauthenticated), (name, results[name])
            assert "revoked" in str(results[name])
        assert isinstance(results["rest"], dict) and results["rest"]["code"] == 16, results["rest"]
        assert "revoked" in results["rest"]["message"]
        close_code, errors = results["ws"]  # type: ignore[misc]
        assert close_code == 4016 and errors and "revoked" in errors[0]["message"], results["ws"]

        # New calls are refused too, and another key's stream goes on.
        with pytest.raises(Unauthenticated):
            client.instances.list()
        assert others_watch.cursor  # still open: closing it below must not raise
    finally:
        watch.close()
        others_watch.close()
        other.instances.list()
        client.close()
        other.close()
        admin = stack.gateway.new_key(TENANT)[1]
        with Cyberdesk(api_key=admin, endpoint=stack.gateway.addr) as cleaner:
            cleaner.instances.delete(box.id)
