"""Previews end to end: servers inside a real sandbox (no network), reached through the gateway's HTTP face.

The servers are python3 scripts run inside the instance: `python3 -m http.server`, a small
BaseHTTPRequestHandler that streams and echoes, and a raw-socket RFC 6455 echo (the sandbox has
no `websockets` package). The sandbox has no network of its own, so every byte here went through
the guest agent's PortService tunnel.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets

from tests.gateway_svc.rest.e2e.conftest import RestStack

HTTP_PORT, APP_PORT, WS_PORT, IDLE_CLOSING_PORT, UNUSED_PORT = 3000, 3001, 3002, 3003, 3999

APP = r"""
import hashlib, json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, body, status=200):
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for part in (b"first\n", b"second\n"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
                time.sleep(2)
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path.startswith("/ticks"):
            # Ticks until the client goes away, then leaves a mark: did its leaving reach us?
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            try:
                for n in range(100):
                    self.wfile.write(b"5\r\ntick\n\r\n")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                open("/tmp/ticks-aborted", "w").close()
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        self._send(json.dumps({"path": self.path, "headers": headers, "peer": self.client_address[1]}).encode())

    def do_POST(self):
        digest, size = hashlib.sha256(), 0
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                length = int(self.rfile.readline().split(b";")[0], 16)
                if length == 0:
                    self.rfile.readline()
                    break
                data = self.rfile.read(length)
                self.rfile.readline()
                digest.update(data)
                size += len(data)
        else:
            left = int(self.headers.get("content-length", "0"))
            while left:
                data = self.rfile.read(min(left, 65536))
                digest.update(data)
                size += len(data)
                left -= len(data)
        self._send(json.dumps({"size": size, "sha256": digest.hexdigest()}).encode())

if len(sys.argv) > 2:
    Handler.timeout = float(sys.argv[2])  # closes a keep-alive connection idle this long
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

WS_ECHO = r"""
import base64, hashlib, socket, struct, sys, threading
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

def serve(conn):
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += conn.recv(4096)
    head, buf = buf.split(b"\r\n\r\n", 1)
    key = next(l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")

    def need(n):
        nonlocal buf
        while len(buf) < n:
            chunk = conn.recv(65536)
            if not chunk:
                raise EOFError
            buf += chunk
        out, buf = buf[:n], buf[n:]
        return out

    while True:
        b0, b1 = need(2)
        op, n = b0 & 15, b1 & 127
        if n == 126:
            n = struct.unpack("!H", need(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", need(8))[0]
        mask = need(4) if b1 & 128 else b"\0\0\0\0"
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(need(n)))
        if op == 9:
            op = 10
        if n < 126:
            size = bytes([n])
        else:
            size = b"\x7e" + struct.pack("!H", n) if n < 65536 else b"\x7f" + struct.pack("!Q", n)
        conn.sendall(bytes([0x80 | op]) + size + payload)
        if op == 8:
            return

server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = server.accept()
    threading.Thread(target=lambda c=conn: (serve(c), c.close()), daemon=True).start()
"""


def _background(c: httpx.Client, instance: str, command: str) -> None:
    with c.stream("POST", f"/v1/instances/{instance}/processes", json={"command": command, "background": True}) as r:
        assert r.status_code == 200
        event = json.loads(next(r.iter_lines()))["result"]["event"]
        assert "started" in event, event


def _wait_serving(c: httpx.Client, instance: str, port: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        r = c.get(f"/v1/instances/{instance}/ports/{port}/")
        if r.status_code != 502 or time.monotonic() > deadline:
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def preview_instance(rest_stack: RestStack) -> Iterator[str]:
    """A running instance with three servers inside: http.server, the app, the WebSocket echo."""
    with rest_stack.client() as c:
        r = c.post("/v1/instances", json={"labels": {"suite": "previews"}})
        assert r.status_code == 200, r.text
        instance = r.json()["instance"]["instanceId"]
        try:
            for name, text in (("app.py", APP), ("ws.py", WS_ECHO), ("www/hello.txt", "hello from inside\n")):
                put = c.put(f"/v1/instances/{instance}/files/tmp/{name}?createParents=true", content=text.encode())
                assert put.status_code == 200, put.text
            _background(c, instance, f"cd /tmp/www && exec python3 -m http.server {HTTP_PORT} --bind 127.0.0.1")
            _background(c, instance, f"exec python3 /tmp/app.py {APP_PORT}")
            _background(c, instance, f"exec python3 /tmp/ws.py {WS_PORT}")
            _background(c, instance, f"exec python3 /tmp/app.py {IDLE_CLOSING_PORT} 0.3")
            for port in (HTTP_PORT, APP_PORT, IDLE_CLOSING_PORT):
                _wait_serving(c, instance, port)
            yield instance
        finally:
            c.delete(f"/v1/instances/{instance}")


def _host(rest_stack: RestStack, instance: str, port: int) -> str:
    return f"{port}-{instance}.localhost:{rest_stack.http_addr.rsplit(':', 1)[1]}"


def test_http_server_through_both_url_forms(rest_stack: RestStack, preview_instance: str) -> None:
    with rest_stack.client() as c:
        by_path = c.get(f"/v1/instances/{preview_instance}/ports/{HTTP_PORT}/hello.txt")
        assert by_path.status_code == 200, by_path.text
        assert by_path.content == b"hello from inside\n"
        head = c.head(f"/v1/instances/{preview_instance}/ports/{HTTP_PORT}/hello.txt")
        assert head.status_code == 200 and head.headers["content-length"] == "18" and head.content == b""
        listing = c.get(f"/v1/instances/{preview_instance}/ports/{HTTP_PORT}/")
        assert listing.status_code == 200 and b"hello.txt" in listing.content
        # The host form: every path of `<port>-<instance>.localhost` is the port's.
        by_host = c.get("/hello.txt", headers={"host": _host(rest_stack, preview_instance, HTTP_PORT)})
        assert by_host.status_code == 200 and by_host.content == b"hello from inside\n"
        missing = c.get("/nope.txt", headers={"host": _host(rest_stack, preview_instance, HTTP_PORT)})
        assert missing.status_code == 404 and b"File not found" in missing.content  # http.server's own 404


def test_the_service_sees_its_own_request_without_our_credentials(rest_stack: RestStack, preview_instance: str) -> None:
    with rest_stack.client() as c:
        r = c.get(f"/v1/instances/{preview_instance}/ports/{APP_PORT}/a/b%20c?x=1&y=2", headers={"cookie": "app=1"})
        assert r.status_code == 200, r.text
        seen = r.json()
        assert seen["path"] == "/a/b%20c?x=1&y=2"
        headers = seen["headers"]
        assert headers["host"] == f"localhost:{APP_PORT}"
        assert headers["x-forwarded-prefix"] == f"/v1/instances/{preview_instance}/ports/{APP_PORT}"
        assert headers["cookie"] == "app=1"
        assert "authorization" not in headers and "x-api-key" not in headers


def test_with_a_token_the_apps_authorization_passes_and_our_keys_do_not(
    rest_stack: RestStack, preview_instance: str
) -> None:
    key = rest_stack.keys["main"]
    with rest_stack.client() as c:
        link = c.post(f"/v1/instances/{preview_instance}/previewUrls", json={"port": APP_PORT}).json()
    url = link["pathUrl"] + "whoami"
    with rest_stack.client(None) as anonymous:
        token = {"x-cyberdesk-preview-token": link["token"]}
        seen = anonymous.get(url, headers={**token, "authorization": "Basic dTpw"}).json()["headers"]
        assert seen["authorization"] == "Basic dTpw" and "x-cyberdesk-preview-token" not in seen
        seen = anonymous.get(url, headers={**token, "authorization": f"Bearer {key}", "x-api-key": key}).json()
        assert "authorization" not in seen["headers"] and "x-api-key" not in seen["headers"]


def test_keep_alive_tunnels_reused_and_a_stale_one_replaced(rest_stack: RestStack, preview_instance: str) -> None:
    with rest_stack.client() as c:
        url = f"/v1/instances/{preview_instance}/ports/{APP_PORT}/"
        peers = {c.get(url).json()["peer"] for _ in range(5)}
        # One connection inside the instance served all five (the app reports its client's port).
        assert len(peers) == 1
        idle_url = f"/v1/instances/{preview_instance}/ports/{IDLE_CLOSING_PORT}/"
        first = c.get(idle_url)
        assert first.status_code == 200
        time.sleep(0.8)  # the service closes the pooled connection after 0.3 s idle
        again = c.get(idle_url)
        assert again.status_code == 200, again.text
        assert again.json()["peer"] != first.json()["peer"]


def test_streamed_response_arrives_before_the_server_finishes(rest_stack: RestStack, preview_instance: str) -> None:
    with rest_stack.client() as c:
        start = time.monotonic()
        with c.stream("GET", f"/v1/instances/{preview_instance}/ports/{APP_PORT}/stream") as r:
            assert r.status_code == 200
            chunks = r.iter_raw()
            first = next(chunks)
            first_at = time.monotonic() - start
            rest = b"".join(chunks)
        total = time.monotonic() - start
    assert first.startswith(b"first\n")
    assert first_at < 1.5, f"the first chunk took {first_at:.2f} s: buffered"
    assert total >= 3.5 and (first + rest) == b"first\nsecond\n"


def test_a_client_leaving_closes_the_connection_inside(rest_stack: RestStack, preview_instance: str) -> None:
    with rest_stack.client() as c:
        with c.stream("GET", f"/v1/instances/{preview_instance}/ports/{APP_PORT}/ticks") as r:
            assert next(r.iter_raw()).startswith(b"tick")
        # The response was closed after one tick: the service's next writes fail within a second or two.
        deadline = time.monotonic() + 15
        while c.get(f"/v1/instances/{preview_instance}/files/tmp/ticks-aborted").status_code != 200:
            assert time.monotonic() < deadline, "the service never saw the client leave"
            time.sleep(0.2)


def test_request_body_streamed_chunked_and_with_length(rest_stack: RestStack, preview_instance: str) -> None:
    data = os.urandom(8 * 1024 * 1024 + 5)

    def pieces() -> Iterator[bytes]:
        for offset in range(0, len(data), 1 << 20):
            yield data[offset : offset + (1 << 20)]

    with rest_stack.client() as c:
        url = f"/v1/instances/{preview_instance}/ports/{APP_PORT}/upload"
        chunked = c.post(url, content=pieces())  # an iterator: httpx sends Transfer-Encoding: chunked
        assert chunked.status_code == 200, chunked.text
        assert chunked.json() == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        sized = c.post(url, content=data)
        assert sized.json() == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_refusals(rest_stack: RestStack, preview_instance: str) -> None:
    url = f"/v1/instances/{preview_instance}/ports/{HTTP_PORT}/hello.txt"
    with rest_stack.client(None) as anonymous:
        r = anonymous.get(url)
        assert r.status_code == 401 and "API key" in r.json()["message"]
        r = anonymous.get(url, headers={"x-cyberdesk-preview-token": "forged.token"})
        assert r.status_code == 401 and r.json()["message"] == "the preview token is not valid"
    with rest_stack.client("other") as other:
        r = other.get(url)
        assert r.status_code == 404 and preview_instance in r.json()["message"]
        r = other.get("/hello.txt", headers={"host": _host(rest_stack, preview_instance, HTTP_PORT)})
        assert r.status_code == 404
        # Nor can another tenant mint a link to it.
        r = other.post(f"/v1/instances/{preview_instance}/previewUrls", json={"port": HTTP_PORT})
        assert r.status_code == 404
    with rest_stack.client() as c:
        r = c.get(f"/v1/instances/{preview_instance}/ports/{UNUSED_PORT}/")
        assert r.status_code == 502
        body = r.json()
        assert body["message"] == f"nothing listens on port {UNUSED_PORT} in the instance" and body["code"] == 14
        assert "sock" not in r.text and "/tmp" not in r.text


def test_tokens(rest_stack: RestStack, preview_instance: str) -> None:
    with rest_stack.client() as c:
        r = c.post(f"/v1/instances/{preview_instance}/previewUrls", json={"port": HTTP_PORT, "ttl": "600s"})
        assert r.status_code == 200, r.text
        private = r.json()
        assert private["url"] == f"http://{_host(rest_stack, preview_instance, HTTP_PORT)}/"
        assert private["pathUrl"] == f"{rest_stack.base_url}/v1/instances/{preview_instance}/ports/{HTTP_PORT}/"
        pub = c.post(f"/v1/instances/{preview_instance}/previewUrls", json={"port": HTTP_PORT, "public": True}).json()
        short = c.post(f"/v1/instances/{preview_instance}/previewUrls", json={"port": HTTP_PORT, "ttl": "1s"}).json()
        bad_ttl = c.post(f"/v1/instances/{preview_instance}/previewUrls", json={"port": HTTP_PORT, "ttl": "0s"})
        assert bad_ttl.status_code == 400
    with rest_stack.client(None) as anonymous:
        # A private token works from the header, not from the URL.
        header = {"x-cyberdesk-preview-token": private["token"]}
        assert anonymous.get(private["pathUrl"] + "hello.txt", headers=header).status_code == 200
        r = anonymous.get(private["pathUrl"] + "hello.txt", params={"cyberdesk_preview_token": private["token"]})
        assert r.status_code == 401 and "not public" in r.json()["message"]
        # A token is for its port only.
        r = anonymous.get(f"/v1/instances/{preview_instance}/ports/{APP_PORT}/", headers=header)
        assert r.status_code == 401
        # A public URL works as it is, and its cookie lets the page's next requests in.
        r = anonymous.get(pub["pathUrl"].replace("/?", "/hello.txt?"))
        assert r.status_code == 200 and r.content == b"hello from inside\n"
        assert r.cookies.get("cyberdesk_preview_token") == pub["token"]
        again = anonymous.get(pub["pathUrl"].split("?")[0] + "hello.txt")
        assert again.status_code == 200
        host_form = anonymous.get(
            "/hello.txt",
            params={"cyberdesk_preview_token": pub["token"]},
            headers={"host": _host(rest_stack, preview_instance, HTTP_PORT)},
        )
        assert host_form.status_code == 200
        time.sleep(1.2)
        r = anonymous.get(short["pathUrl"] + "hello.txt", headers={"x-cyberdesk-preview-token": short["token"]})
        assert r.status_code == 401 and "expired" in r.json()["message"]


def test_websocket_echo_through_both_forms(rest_stack: RestStack, preview_instance: str) -> None:
    key = rest_stack.keys["main"]
    port = rest_stack.http_addr.rsplit(":", 1)[1]

    async def echo(url: str, headers: dict[str, str], **connect: object) -> None:
        async with websockets.connect(url, additional_headers=headers, open_timeout=20, **connect) as ws:  # type: ignore[arg-type]
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), 10) == "hello"
            blob = os.urandom(200_000)
            await ws.send(blob)
            assert await asyncio.wait_for(ws.recv(), 10) == blob

    async def refused(url: str, headers: dict[str, str]) -> int:
        try:
            async with websockets.connect(url, additional_headers=headers, open_timeout=20):
                return 101
        except websockets.exceptions.InvalidStatus as exc:
            return exc.response.status_code

    async def main() -> None:
        auth = {"authorization": f"Bearer {key}"}
        await echo(f"{rest_stack.ws_url}/v1/instances/{preview_instance}/ports/{WS_PORT}/echo", auth)
        # The host form: the URL names the preview host, the socket goes to the gateway's address.
        await echo(f"ws://{_host(rest_stack, preview_instance, WS_PORT)}/echo", auth, host="127.0.0.1", port=int(port))
        base = f"{rest_stack.ws_url}/v1/instances/{preview_instance}/ports"
        assert await refused(f"{base}/{WS_PORT}/", {}) == 401
        assert await refused(f"{base}/{WS_PORT}/", {"x-api-key": rest_stack.keys["other"]}) == 404
        assert await refused(f"{base}/{UNUSED_PORT}/", auth) == 502
        # A browser's flow: a public link's cookie (set by the first page, see test_tokens) is all
        # the page's WebSocket carries.
        async with httpx.AsyncClient(base_url=rest_stack.base_url, headers=auth, timeout=20) as http:
            url = f"/v1/instances/{preview_instance}/previewUrls"
            link = (await http.post(url, json={"port": WS_PORT, "public": True})).json()
        token = link["token"]
        await echo(f"{base}/{WS_PORT}/", {"cookie": f"cyberdesk_preview_token={token}"})
        # The PTY WebSocket of the API still works beside previews.
        async with websockets.connect(
            f"{rest_stack.ws_url}/v1/instances/{preview_instance}/pty?open.size.cols=80&open.size.rows=24",
            additional_headers=auth,
        ) as pty:
            assert json.loads(await asyncio.wait_for(pty.recv(), 20))["type"] == "started"

    asyncio.run(main())
