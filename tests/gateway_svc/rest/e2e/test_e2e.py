"""The REST face end to end: httpx and websockets against the gateway process, real instance_svc and sandboxes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from gateway_svc.keystore import KeyStore
from tests.gateway_svc.rest.e2e.conftest import OTHER_TENANT, TENANT, RestStack, gateway_process


def _lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _events(items: list[dict[str, object]]) -> list[dict[str, object]]:
    return [item["result"]["event"] for item in items]  # type: ignore[index]


# -- instances -------------------------------------------------------------------------------------


def test_create_get_list_pages_delete(rest_stack: RestStack) -> None:
    with rest_stack.client() as c:
        ids = []
        for n in range(2):
            r = c.post("/v1/instances", json={"labels": {"suite": "paging", "n": str(n)}})
            assert r.status_code == 200, r.text
            ids.append(r.json()["instance"]["instanceId"])
        got = c.get(f"/v1/instances/{ids[0]}").json()["instance"]
        assert got["instanceId"] == ids[0] and got["labels"] == {"suite": "paging", "n": "0"}
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            params = {"pageSize": "1", "labels[suite]": "paging"}
            if token:
                params["pageToken"] = token
            page = c.get("/v1/instances", params=params)
            assert page.status_code == 200, page.text
            body = page.json()
            assert len(body["instances"]) <= 1
            seen += [i["instanceId"] for i in body["instances"]]
            pages += 1
            token = body.get("nextPageToken", "")
            if not token:
                break
        assert sorted(seen) == sorted(ids) and pages >= 2
        for instance_id in ids:
            r = c.delete(f"/v1/instances/{instance_id}")
            assert r.status_code == 200 and r.json()["instance"]["state"] == "INSTANCE_STATE_TERMINATED"
        # Another tenant's key sees nothing of them.
    with rest_stack.client("other") as other:
        r = other.get(f"/v1/instances/{ids[0]}")
        assert r.status_code == 404 and r.json()["code"] == 5


def _http_response(conn: socket.socket) -> bytes:
    """One HTTP/1.1 response read off a raw connection (b"" if the server closed it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    # A body of known length, or a chunked one (ended by its empty last chunk).
    while (len(body) < int(length.group(1))) if length else not body.endswith(b"0\r\n\r\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_an_idle_connection_outlives_a_clients_own_idle_timeout(rest_stack: RestStack) -> None:
    """A keep-alive connection left idle for 6 s still answers on the same socket.

    The gateway keeps idle connections HTTP_IDLE_SECONDS (75 s), longer than clients keep theirs
    (undici 4 s), so the client closes first: with uvicorn's default of 5 s the server closed while
    the TypeScript SDK, on a loaded machine, reused the connection, and its request was reset.
    """
    host, _, port = rest_stack.http_addr.rpartition(":")
    request = f"GET /v1/instances HTTP/1.1\r\nHost: {rest_stack.http_addr}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=20) as conn:
        conn.sendall(request)
        first = _http_response(conn)
        time.sleep(6)
        conn.sendall(request)
        second = _http_response(conn)
    assert first.startswith(b"HTTP/1.1 401"), first[:200]
    assert second.startswith(b"HTTP/1.1 401"), f"the idle connection was closed: {second[:200]!r}"


def test_a_watch_answers_once_it_is_in_place_with_its_cursor(rest_stack: RestStack) -> None:
    # The response (status and cyberdesk-watch-cursor) comes when the watch is live, before any
    # change: a client that creates an instance after that misses nothing, and can resume from the
    # cursor if it is cut off before the first change. Nothing changes in this tenant meanwhile.
    with (
        rest_stack.client() as c,
        c.stream("GET", "/v1/instances:watch", timeout=httpx.Timeout(30.0, read=20.0)) as watch,
    ):
        assert watch.status_code == 200
        start = watch.headers["cyberdesk-watch-cursor"]
        assert start
        created = c.post("/v1/instances", json={"labels": {"suite": "watch-head"}})
        assert created.status_code == 200, created.text
        instance_id = created.json()["instance"]["instanceId"]
        try:
            for line in watch.iter_lines():
                if instance_id in line:
                    event = json.loads(line)["result"]
                    assert event["cursor"] and event["cursor"] != start
                    break
        finally:
            c.delete(f"/v1/instances/{instance_id}")


# -- processes ---------------------------------------------------------------------------------------


def test_a_run_whose_client_leaves_is_cancelled_with_its_process(rest_stack: RestStack, rest_instance: str) -> None:
    # A unary RunProcess whose HTTP client disconnects is cancelled upstream, as over gRPC, so its
    # command is killed instead of running on for nobody. The marker file is written by the command
    # only if it outlives the sleep.
    marker = f"/tmp/abandoned-{os.getpid()}"
    command = f"rm -f {marker}; sleep 3 && touch {marker}"
    with rest_stack.client() as c, pytest.raises(httpx.ReadTimeout):
        c.post(f"/v1/instances/{rest_instance}/processes:run", json={"command": command}, timeout=1.0)
    with rest_stack.client() as c:
        # The abandoned command would have touched the marker by now; a fresh one proves the route works.
        done = c.post(f"/v1/instances/{rest_instance}/processes:run", json={"command": "sleep 4; echo waited"})
        assert done.status_code == 200, done.text
        probe = c.post(f"/v1/instances/{rest_instance}/processes:run", json={"command": f"test -e {marker}"})
        assert probe.status_code == 200, probe.text
        assert probe.json()["exited"].get("exitCode") == 1, "the abandoned command ran on after its client left"


def test_exec_ndjson_and_sse(rest_stack: RestStack, rest_instance: str) -> None:
    with rest_stack.client() as c:
        r = c.post(f"/v1/instances/{rest_instance}/processes", json={"command": "echo out; echo err >&2; exit 3"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        events = _events(_lines(r.text))
        assert "started" in events[0] and "exited" in events[-1]
        assert events[-1]["exited"]["exitCode"] == 3  # type: ignore[index]
        out = b"".join(base64.b64decode(e["stdout"]) for e in events if "stdout" in e)  # type: ignore[arg-type]
        err = b"".join(base64.b64decode(e["stderr"]) for e in events if "stderr" in e)  # type: ignore[arg-type]
        assert out == b"out\n" and err == b"err\n"

        with c.stream(
            "POST",
            f"/v1/instances/{rest_instance}/processes",
            json={"argv": ["printf", "sse"]},
            headers={"accept": "text/event-stream"},
        ) as s:
            assert s.status_code == 200 and s.headers["content-type"] == "text/event-stream"
            raw = s.read().decode()
        blocks = [b for b in raw.split("\n\n") if b]
        assert all(b.startswith("event: result\ndata: ") for b in blocks)
        sse_events = [json.loads(b.split("data: ", 1)[1])["result"]["event"] for b in blocks]
        assert base64.b64decode(sse_events[1]["stdout"]) == b"sse"
        assert sse_events[-1]["exited"]["exitCode"] == 0


def test_stream_process_input_ndjson(rest_stack: RestStack, rest_instance: str) -> None:
    with rest_stack.client() as c:
        with c.stream(
            "POST",
            f"/v1/instances/{rest_instance}/processes",
            json={"command": "cat > /tmp/stdin.txt", "background": True, "keepStdinOpen": True, "tag": "catter"},
        ) as start:
            assert start.status_code == 200
            # Leaving the stream early cancels the call; a background process keeps running.
            pid = json.loads(next(start.iter_lines()))["result"]["event"]["started"]["pid"]
        lines = [json.dumps({"data": base64.b64encode(f"line {n}\n".encode()).decode()}) for n in range(3)]
        body = "\n".join(lines) + "\n"
        r = c.post(f"/v1/instances/{rest_instance}/processes/{pid}:streamInput", content=body.encode())
        assert r.status_code == 200, r.text
        assert int(r.json()["bytesWritten"]) == 21
        # A bad line is 400 naming the line (the first, empty, message writes nothing).
        bad = c.post(f"/v1/instances/{rest_instance}/processes/{pid}:streamInput", content=b'{}\n{"nope": 1}\n')
        assert bad.status_code == 400 and "request line 2" in bad.json()["message"] and "nope" in bad.json()["message"]
        assert c.post(f"/v1/instances/{rest_instance}/processes/{pid}:closeStdin", json={}).status_code == 200
        done = c.post(f"/v1/instances/{rest_instance}/processes/{pid}:connect", json={})
        assert done.status_code == 200 and "exited" in _events(_lines(done.text))[-1]
        got = c.get(f"/v1/instances/{rest_instance}/files/tmp/stdin.txt")
        assert got.status_code == 200 and got.content == b"line 0\nline 1\nline 2\n"


# -- files ---------------------------------------------------------------------------------------------


def test_file_put_get_range_sha256(rest_stack: RestStack, rest_instance: str) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # several upload chunks and an odd tail
    sha = hashlib.sha256(data).hexdigest()
    url = f"/v1/instances/{rest_instance}/files/tmp/rest/dir/blob.bin"
    with rest_stack.client() as c:

        def body() -> object:
            # A streamed (chunked) request body: the gateway never sees it whole.
            for i in range(0, len(data), 100_000):
                yield data[i : i + 100_000]

        r = c.put(url, params={"createParents": "true", "expectedSha256": sha}, content=body())
        assert r.status_code == 200, r.text
        assert r.json() == {"path": "/tmp/rest/dir/blob.bin", "size": str(len(data)), "sha256": sha}

        full = c.get(url)
        assert full.status_code == 200 and full.headers["content-type"] == "application/octet-stream"
        assert full.headers["content-length"] == str(len(data)) and full.headers["accept-ranges"] == "bytes"
        assert full.content == data

        head = c.head(url)
        assert head.status_code == 200 and head.headers["x-cyberdesk-sha256"] == sha
        assert head.headers["content-length"] == str(len(data)) and not head.content
        assert head.headers["repr-digest"] == f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"

        part = c.get(url, headers={"range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == data[1000:2000]
        assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
        ranged_head = c.head(url, headers={"range": "bytes=1000-1999"})
        assert ranged_head.headers["x-cyberdesk-sha256"] == hashlib.sha256(data[1000:2000]).hexdigest()

        tail = c.get(url, headers={"range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == data[-10:]
        assert tail.headers["content-range"] == f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}"
        open_end = c.get(url, headers={"range": f"bytes={len(data) - 5}-"})
        assert open_end.status_code == 206 and open_end.content == data[-5:]
        past_end = c.get(url, headers={"range": f"bytes={len(data) - 5}-{len(data) + 100}"})
        assert past_end.status_code == 206 and past_end.content == data[-5:]

        for unsatisfiable in (f"bytes={len(data)}-", f"bytes={len(data) + 10}-{len(data) + 20}", "bytes=-0"):
            bad = c.get(url, headers={"range": unsatisfiable})
            assert bad.status_code == 416, unsatisfiable
            assert bad.headers["content-range"] == f"bytes */{len(data)}" and bad.json()["code"] == 11
        ignored = c.get(url, headers={"range": "bytes=5-1"})  # not a valid range: ignored, whole file
        assert ignored.status_code == 200 and len(ignored.content) == len(data)

        # The upload's header options, short or full names; an existing file is 409 without overwrite.
        again = c.put(url, content=b"new")
        assert again.status_code == 409 and again.json()["code"] == 6
        over = c.put(url, params={"header.overwrite": "true", "mode": "384"}, content=b"new")
        assert over.status_code == 200 and over.json()["size"] == "3"
        wrong = c.put(url, params={"overwrite": "true", "expectedSha256": "0" * 64}, content=b"other")
        assert wrong.status_code == 500 and wrong.json()["code"] == 15  # DATA_LOSS: nothing written
        assert c.get(url).content == b"new"
        missing = c.get(f"/v1/instances/{rest_instance}/files/tmp/rest/nope.bin")
        assert missing.status_code == 404 and missing.json()["code"] == 5
        empty = c.put(f"/v1/instances/{rest_instance}/files/tmp/rest/empty", content=b"")
        assert empty.status_code == 200 and empty.json()["size"] == "0"
        got_empty = c.get(f"/v1/instances/{rest_instance}/files/tmp/rest/empty")
        assert got_empty.status_code == 200 and got_empty.content == b""


# -- desktop -------------------------------------------------------------------------------------------


def test_screenshot_of_a_desktop_instance(rest_stack: RestStack) -> None:
    with rest_stack.client() as c:
        r = c.post("/v1/instances", json={"template": "desktop", "desktop": {"width": 640, "height": 480}})
        assert r.status_code == 200, r.text
        instance_id = r.json()["instance"]["instanceId"]
        try:
            assert r.json()["instance"]["state"] == "INSTANCE_STATE_RUNNING", r.text
            shot = c.post(f"/v1/instances/{instance_id}/desktop:screenshot", json={"format": "IMAGE_FORMAT_PNG"})
            assert shot.status_code == 200, shot.text
            body = shot.json()
            image = base64.b64decode(body["image"])
            assert image.startswith(b"\x89PNG\r\n\x1a\n")
            assert (body["width"], body["height"]) == (640, 480)
            display = c.get(f"/v1/instances/{instance_id}/desktop")
            assert display.status_code == 200, display.text
        finally:
            c.delete(f"/v1/instances/{instance_id}")


# -- errors --------------------------------------------------------------------------------------------


def test_error_classes(rest_stack: RestStack, rest_instance: str) -> None:
    with rest_stack.client() as c:
        bad_json = c.post("/v1/instances", content=b'{"labels": ')
        assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["message"]
        unknown = c.post("/v1/instances", json={"desktop": {"widht": 3}})
        assert unknown.status_code == 400 and "unknown field desktop.widht" in unknown.json()["message"]
        unknown_query = c.get("/v1/instances", params={"bogus": "1"})
        assert unknown_query.status_code == 400 and "bogus" in unknown_query.json()["message"]
        not_found = c.get("/v1/instances/i-doesnotexist")
        assert not_found.status_code == 404 and not_found.json()["code"] == 5
        no_route = c.get("/v2/nothing")
        assert no_route.status_code == 404
        # FAILED_PRECONDITION is 400 by the canonical mapping, code 9 in the body.
        resume = c.post(f"/v1/instances/{rest_instance}:resume", json={})
        assert resume.status_code == 400 and resume.json()["code"] == 9, resume.text
    with rest_stack.client(None) as anon:
        missing = anon.get(f"/v1/instances/{rest_instance}")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "missing API key" in missing.json()["message"]
        wrong = anon.get(f"/v1/instances/{rest_instance}", headers={"x-api-key": "cd_not-a-key"})
        assert wrong.status_code == 401 and wrong.json()["code"] == 16
        by_header = anon.get(f"/v1/instances/{rest_instance}", headers={"x-api-key": rest_stack.keys["main"]})
        assert by_header.status_code == 200
    # A key without the `instances` scope: 403.
    store = KeyStore(rest_stack.state / "gateway_keys.sqlite3")
    try:
        _, scoped = store.create(TENANT, "billing-only", ["billing"])
    finally:
        store.close()
    forbidden = httpx.get(f"{rest_stack.base_url}/v1/instances", headers={"authorization": f"Bearer {scoped}"})
    assert forbidden.status_code == 403 and forbidden.json()["code"] == 7
    # Rate limit: 429 with Retry-After (whole seconds) and a RetryInfo detail.
    limited = rest_stack.new_key(TENANT, rate_limit="1/60s")
    with httpx.Client(base_url=rest_stack.base_url, headers={"x-api-key": limited}) as c2:
        assert c2.get("/v1/instances").status_code == 200
        over = c2.get("/v1/instances")
        assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
        assert over.json()["details"][0]["@type"] == "type.googleapis.com/google.rpc.RetryInfo"
    # Another tenant's instance does not exist for this key, on the agent routes too.
    with rest_stack.client("other") as other:
        hidden = other.post(f"/v1/instances/{rest_instance}/processes", json={"command": "true"})
        assert (
            hidden.status_code == 404
            and other.get(f"/v1/instances/{rest_instance}/files/etc/hostname").status_code == 404
        )


def test_unavailable_instance_service_is_503(rest_stack: RestStack, tmp_path: Path) -> None:
    # A second gateway over the same key store whose instance_svc address has nothing listening.
    with gateway_process(tmp_path, rest_stack.state, f"127.0.0.1:{_dead_port()}", rest_stack.redis_url) as gw:
        url = f"http://{gw.http_addr}"  # type: ignore[attr-defined]
        headers = {"authorization": f"Bearer {rest_stack.keys['main']}"}
        r = httpx.get(f"{url}/v1/instances/i-any", headers=headers, timeout=30)
        assert r.status_code == 503 and r.json()["code"] == 14
        r = httpx.post(f"{url}/v1/instances/i-any/processes", json={"command": "true"}, headers=headers, timeout=30)
        assert r.status_code == 503 and "unreachable" in r.json()["message"]
        # SIGTERM stops both faces cleanly.
        assert gw.terminate() == 0
        assert "Traceback" not in gw.log() and rest_stack.keys["main"] not in gw.log()


def _dead_port() -> int:
    from tests.support.procs import free_port

    return free_port()


# -- WebSocket shell -------------------------------------------------------------------------------------


async def _read_until(ws: websockets.ClientConnection, needle: bytes, limit: int = 200) -> bytes:
    seen = b""
    for _ in range(limit):
        try:
            frame = await asyncio.wait_for(ws.recv(), 20)
        except websockets.ConnectionClosed as closed:
            raise AssertionError(f"{needle!r} not seen before the close ({closed}) in {seen[-500:]!r}") from None
        if isinstance(frame, bytes):
            seen += frame
            if needle in seen:
                return seen
    raise AssertionError(f"{needle!r} not seen in {seen[-500:]!r}")


async def _next_control(ws: websockets.ClientConnection) -> dict[str, object]:
    """The next JSON control frame, skipping terminal bytes still in flight."""
    for _ in range(200):
        frame = await asyncio.wait_for(ws.recv(), 20)
        if isinstance(frame, str):
            value: dict[str, object] = json.loads(frame)
            return value
    raise AssertionError("no control frame")


def test_websocket_close_keeps_the_keystrokes_sent_before_it(rest_stack: RestStack, rest_instance: str) -> None:
    """Type, then leave at once, ten times: every last line reaches the background terminal.

    The relay leaves the terminal with `detach`, which the agent applies after the keystrokes; a
    cancelled call could drop a line still in flight. Half the clients just close the socket and
    do not wait for that, so a line may reach the terminal after the next client's: the check
    waits until all ten are in. The other half send a `detach` frame and see the socket closed
    with 1000 "detached" once it was applied.
    """

    async def scenario() -> None:
        url = f"{rest_stack.ws_url}/v1/instances/{rest_instance}/pty"
        auth = {"authorization": f"Bearer {rest_stack.keys['main']}"}
        opened = {"type": "open", "argv": ["bash", "--norc", "-i"], "tag": "ws-leaver", "background": True}
        for n in range(10):
            async with websockets.connect(url, additional_headers=auth) as ws:
                await ws.send(json.dumps(opened if n == 0 else {"type": "attach", "tag": "ws-leaver"}))
                assert (await _next_control(ws))["type"] == "started"
                for _ in range(20):  # frames ahead of the line: it is the one still in flight at the close
                    await ws.send(b":\n")
                await ws.send(f"M{n}=k$((40+{n}))\n".encode())
                if n % 2:  # half of them leave with a detach frame: the server closes once it is applied
                    await ws.send(json.dumps({"type": "detach"}))
                    with pytest.raises(websockets.ConnectionClosedOK):
                        for _ in range(10_000):
                            await asyncio.wait_for(ws.recv(), 20)
                    assert (ws.close_code, ws.close_reason) == (1000, "detached")
        async with websockets.connect(url, additional_headers=auth) as ws:
            await ws.send(json.dumps({"type": "attach", "tag": "ws-leaver"}))
            assert (await _next_control(ws))["type"] == "started"
            line = "".join(f"$M{n}" for n in range(10))
            seen, marks = b"", b""
            for attempt in range(30):  # the echo of the typed line never matches: it has $M0, not k40
                await ws.send(f"echo marks=[{line}]\n".encode())
                while len(found := re.findall(rb"marks=\[((?:k4\d)*)\]\r\n", seen)) <= attempt:
                    frame = await asyncio.wait_for(ws.recv(), 20)
                    seen += frame if isinstance(frame, bytes) else b""
                marks = found[-1]
                if marks == b"k40k41k42k43k44k45k46k47k48k49":
                    break
                await asyncio.sleep(0.2)
            assert marks == b"k40k41k42k43k44k45k46k47k48k49", seen[-800:]
            await ws.send(b"exit 0\n")

    asyncio.run(scenario())


def test_websocket_shell_with_resize(rest_stack: RestStack, rest_instance: str) -> None:
    async def scenario() -> None:
        url = f"{rest_stack.ws_url}/v1/instances/{rest_instance}/pty"
        key = rest_stack.keys["main"]
        async with websockets.connect(url, additional_headers={"authorization": f"Bearer {key}"}) as ws:
            await ws.send(json.dumps({"type": "open", "cols": 80, "rows": 24, "argv": ["/bin/bash", "--norc", "-i"]}))
            started = await _next_control(ws)
            assert started["type"] == "started" and int(started["pid"]) > 0, started  # type: ignore[call-overload]
            await ws.send(b"stty size\n")
            await _read_until(ws, b"24 80")
            await ws.send(json.dumps({"type": "resize", "cols": 132, "rows": 43}))
            await ws.send(b"stty size\n")
            await _read_until(ws, b"43 132")
            # A bad control frame is reported; the shell stays usable.
            await ws.send(json.dumps({"type": "resize", "cols": -1}))
            err = await _next_control(ws)
            assert err["type"] == "error" and err["code"] == 3 and "cols" in str(err["message"])
            # SIGINT goes to the terminal's foreground group: the job says it runs before it is sent
            # (sent earlier, bash itself would get it); the computed needle never matches the echo.
            await ws.send(b"sh -c 'echo sleeping-$((40+2)); exec sleep 30'\n")
            await _read_until(ws, b"sleeping-42")
            await ws.send(json.dumps({"type": "signal", "signal": "SIGINT"}))
            await ws.send(b"echo after-$((6*7))\n")
            await _read_until(ws, b"after-42")
            await ws.send(b"exit 5\n")
            exited = await _next_control(ws)
            assert exited["type"] == "exit" and exited["exitCode"] == 5
            with pytest.raises(websockets.ConnectionClosedOK):
                await asyncio.wait_for(ws.recv(), 20)
            assert ws.close_code == 1000

        # The key as a subprotocol (browsers cannot set headers); cyberdesk.v1 is selected.
        protocols = ["cyberdesk.v1", f"cyberdesk.key.{key}"]
        async with websockets.connect(url + "?open.size.cols=50&open.size.rows=7", subprotocols=protocols) as ws:  # type: ignore[arg-type]
            assert ws.subprotocol == "cyberdesk.v1"
            started = await _next_control(ws)  # opened from the query
            assert started["type"] == "started", started
            await ws.send(b"stty size; exit\n")
            await _read_until(ws, b"7 50")

        # Refused handshakes are HTTP errors with the usual status.
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(url):
                pass
        assert refused.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as hidden:
            other = rest_stack.keys["other"]
            async with websockets.connect(url, additional_headers={"x-api-key": other}):
                pass
        assert hidden.value.response.status_code == 404
        # A first frame that is neither open nor attach ends the socket with 4000 + INVALID_ARGUMENT.
        async with websockets.connect(url, additional_headers={"x-api-key": key}) as ws:
            await ws.send(json.dumps({"type": "resize", "cols": 1, "rows": 1}))
            err = await _next_control(ws)
            assert err["type"] == "error" and err["code"] == 3
            with pytest.raises(websockets.ConnectionClosedError):
                await asyncio.wait_for(ws.recv(), 20)
            assert ws.close_code == 4003

    asyncio.run(scenario())


def test_openapi_is_served(rest_stack: RestStack) -> None:
    doc = httpx.get(f"{rest_stack.base_url}/openapi.json").json()
    assert doc["openapi"].startswith("3.1") and "/v1/instances/{instance_id}/files/{path}" in doc["paths"]
    assert OTHER_TENANT != TENANT
