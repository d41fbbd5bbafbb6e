"""The web console in Debian's chromium (Playwright's Python client, no browser download) against a real stack.

One `cyberdesk up` stack and one browser for the module (tests/cli/stack.py). What is proven, as
a person would see it: signing in with a key (and refusal of a bad one in one sentence), the key
kept out of every storage a page script can read, creating a desktop instance from the page and
its live desktop embedded (the viewer's canvas gets the instance's screen size, so the RFB stream
is connected; tests/desktop_stream checks pixels and input in depth), `echo hi` typed in the
xterm.js terminal and `hi` read back, a file uploaded and downloaded through the page, another
tenant's instance never listed, CSRF (a cookie-authenticated POST without the token refused, and
the cookie refused from another origin), sign-out, and revoking the key ending the session.

Screenshots of every page at 1280x800 and at a 390x844 phone viewport are saved under
$CYBERDESK_TEST_ARTIFACTS/console, else `artifacts/console/` in the checkout (git-ignored).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from cyberdesk import Cyberdesk
from cyberdesk_stack.browser import launch_chromium
from gateway_svc.keystore import KeyStore, create_key, store_path
from tests.cli.stack import RunningStack, running_stack
from tests.support.procs import ROOT

pytestmark = [pytest.mark.timeout(240), pytest.mark.sandbox, pytest.mark.desktop]

ARTIFACTS = Path(os.environ.get("CYBERDESK_TEST_ARTIFACTS", ROOT / "artifacts")) / "console"
DESKTOP = (1024, 768)
WAIT_MS = 30_000  # a loaded 2-core machine: generous, never a sleep


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    if not (ROOT / "console" / "dist" / "index.html").exists():
        pytest.fail("the console is not built: run `make setup`")
    # A 1 s auth cache: a revoked key's session ends within about a second (default 5 s).
    with running_stack(tmp_path_factory.mktemp("console-stack"), {"CYBERDESK_AUTH_CACHE_SECONDS": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        launched = launch_chromium(pw)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def base(stack: RunningStack) -> str:
    return stack.env_config()["http_endpoint"].rstrip("/")


@pytest.fixture(scope="module")
def admin_key(stack: RunningStack) -> str:
    return stack.env_config()["api_key"]


def _key(stack: RunningStack, tenant: str, admin: bool = False) -> tuple[str, str]:
    """(key id, secret) of a new key in the stack's key store."""
    record, secret = create_key(stack.state_dir, tenant, "console-test", ["instances", "admin"] if admin else None)
    return record.key_id, secret


def _shot(page: Page, name: str) -> None:
    """Screenshots of the page as it is, at 1280x800 and at a phone's 390x844."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1280, "height": 800})
    page.screenshot(path=str(ARTIFACTS / f"{name}-1280x800.png"))
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(ARTIFACTS / f"{name}-390x844.png"))
    # Nothing spills sideways on a phone: the page is no wider than the screen.
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390 + 1, f"{name} is {width}px wide on a 390px screen"
    page.set_viewport_size({"width": 1280, "height": 800})


def _sign_in(context: BrowserContext, base: str, key: str) -> Page:
    page = context.new_page()
    page.goto(base + "/")
    page.locator("#api-key").fill(key)
    page.locator("#sign-in").click()
    expect(page.locator("#instances")).to_be_visible(timeout=WAIT_MS)
    return page


def _request(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(HTTP status, JSON body) of a GET with `headers` (urllib: no browser, so no Origin unless given)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_bad_key_is_refused_in_one_sentence(browser: Browser, base: str) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        page.goto(base + "/")
        expect(page.locator("#sign-in-form")).to_be_visible(timeout=WAIT_MS)
        _shot(page, "signin")
        bad = "cd_" + secrets.token_urlsafe(32)
        page.locator("#api-key").fill(bad)
        page.locator("#sign-in").click()
        error = page.locator("#sign-in-form .error")
        expect(error).to_have_text(re.compile(r"^The API key is not valid\.$"), timeout=WAIT_MS)
        assert bad not in page.content()
        assert context.cookies() == []  # no session was started
    finally:
        context.close()


def test_console_end_to_end(browser: Browser, stack: RunningStack, base: str, admin_key: str, tmp_path: Path) -> None:
    # Another tenant's instance exists before the page loads and is created while it is open.
    _, other_key = _key(stack, "other-console")
    other = Cyberdesk(api_key=other_key, endpoint=stack.gateway)
    foreign = other.instances.create(timeout=300)
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    try:
        page = _sign_in(context, base, admin_key)
        # The key is in no storage a script can read; the cookie is HttpOnly and SameSite=Strict.
        stores = page.evaluate("[JSON.stringify(localStorage), JSON.stringify(sessionStorage), document.cookie]")
        assert all(admin_key not in text for text in stores), stores
        assert stores[2] == ""  # HttpOnly: document.cookie does not show it
        (cookie,) = context.cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == ("cyberdesk_session", True, "Strict")
        assert admin_key not in cookie["value"]

        # Create a desktop instance from the page (after a refused one: its error in one sentence).
        page.locator("#create-panel summary").click()
        page.locator("#create-template").fill("nope")
        page.locator("#create").click()
        expect(page.locator("#instances-error")).to_have_text(
            "Template 'nope' is unknown; use one of base, desktop.", timeout=WAIT_MS
        )
        page.locator("#create-template").fill("base")
        page.locator("#create-desktop").check()
        page.locator("#create-width").fill(str(DESKTOP[0]))
        page.locator("#create-height").fill(str(DESKTOP[1]))
        _shot(page, "instances-create")
        page.locator("#create").click()
        expect(page.locator("#instance-state")).to_have_text("RUNNING", timeout=60_000)
        instance_id = page.url.rsplit("/", 1)[-1]
        assert instance_id.startswith("i-"), page.url

        # Its actions on its own page, the state seen back through its watch.
        page.locator("#instance-actions").get_by_role("button", name="Pause").click()
        expect(page.locator("#instance-state")).to_have_text("PAUSED", timeout=WAIT_MS)
        page.locator("#instance-actions").get_by_role("button", name="Resume").click()
        expect(page.locator("#instance-state")).to_have_text("RUNNING", timeout=WAIT_MS)

        # Its live desktop, embedded: the viewer's canvas takes the instance's screen size once
        # the RFB stream is connected.
        viewer = page.frame_locator("#desktop-viewer")
        canvas = viewer.locator("canvas").first
        expect(canvas).to_be_visible(timeout=WAIT_MS)
        deadline = time.monotonic() + 30
        size = (0, 0)
        while time.monotonic() < deadline:
            size = tuple(canvas.evaluate("c => [c.width, c.height]"))
            if size == DESKTOP:
                break
            page.wait_for_timeout(200)
        assert size == DESKTOP, size
        _shot(page, "instance-desktop")

        # The terminal: type `echo hi`, read `hi` back as its own line.
        page.locator("#tab-terminal").click()
        rows = page.locator("#terminal .xterm-rows")
        expect(rows).to_contain_text("$", timeout=WAIT_MS)  # the prompt: input typed before it may be lost
        page.locator("#terminal").click()
        page.keyboard.type("echo hi")
        page.keyboard.press("Enter")
        expect(rows.locator("div", has_text=re.compile(r"^\s*hi\s*$"))).to_have_count(1, timeout=WAIT_MS)
        _shot(page, "instance-terminal")

        # Files: upload through the page, see it listed, download it back.
        page.locator("#tab-files").click()
        expect(page.locator("#files")).to_be_visible(timeout=WAIT_MS)
        local = tmp_path / "notes.txt"
        content = secrets.token_bytes(200_000)
        local.write_bytes(content)
        page.locator("#files-upload").set_input_files(str(local))
        link = page.locator('a[data-file="notes.txt"]')
        expect(link).to_be_visible(timeout=WAIT_MS)
        with page.expect_download(timeout=WAIT_MS) as download:
            link.click()
        assert Path(download.value.path()).read_bytes() == content
        _shot(page, "instance-files")

        page.locator("#tab-processes").click()
        expect(page.locator("#processes tbody tr").first).to_be_visible(timeout=WAIT_MS)
        _shot(page, "instance-processes")
        page.locator("#tab-screenshots").click()
        page.locator("#take-screenshot").click()
        expect(page.locator("#screenshots img")).to_have_count(1, timeout=WAIT_MS)
        _shot(page, "instance-screenshots")

        # The instances page: ours is listed, the other tenant's never is (neither the one made
        # before nor one made while the page watches).
        page.goto(base + "/#/instances")
        expect(page.locator(f'tr[data-instance="{instance_id}"]')).to_be_visible(timeout=WAIT_MS)
        late = other.instances.create(timeout=300)
        ours = Cyberdesk(api_key=admin_key, endpoint=stack.gateway).instances.create(timeout=300)
        row = page.locator(f'tr[data-instance="{ours.id}"]')
        expect(row).to_be_visible(timeout=WAIT_MS)  # the watch works
        # Its actions, each seen back through the watch: pause, resume, delete (after confirming).
        row.get_by_role("button", name="Pause").click()
        expect(row.locator(".state")).to_have_text("PAUSED", timeout=WAIT_MS)
        row = page.locator(f'tr[data-instance="{ours.id}"]')
        row.get_by_role("button", name="Resume").click()
        expect(row.locator(".state")).to_have_text("RUNNING", timeout=WAIT_MS)
        page.once("dialog", lambda dialog: dialog.accept())
        page.locator(f'tr[data-instance="{ours.id}"] [data-delete]').click()
        expect(page.locator(f'tr[data-instance="{ours.id}"]')).to_have_count(0, timeout=WAIT_MS)
        for hidden in (foreign.id, late.id):
            assert page.locator(f'tr[data-instance="{hidden}"]').count() == 0
        _shot(page, "instances")
        # Nor can its page be opened by id: to this tenant it does not exist.
        page.goto(base + f"/#/instances/{foreign.id}")
        expect(page.locator("main .error")).to_have_text(f"Instance {foreign.id} not found.", timeout=WAIT_MS)

        # CSRF: the cookie alone does not make a state-changing call; from another origin, nothing.
        refused = page.evaluate(
            """async () => {
                 const r = await fetch("/v1/instances", {method: "POST", body: "{}", credentials: "same-origin"});
                 return [r.status, (await r.json()).message];
               }"""
        )
        assert refused[0] == 403 and "CSRF" in refused[1], refused
        jar = f"cyberdesk_session={cookie['value']}"
        status, body = _request(base + "/v1/instances", headers={"cookie": jar, "origin": "http://evil.example"})
        assert status == 403 and "own origin" in body["message"], body
        status, _ = _request(base + "/v1/instances", headers={"cookie": jar})
        assert status == 200

        page.goto(base + "/#/keys")
        expect(page.locator("#keys tbody tr").first).to_be_visible(timeout=WAIT_MS)
        # A key made on the page: its secret shown once and valid; revoked on the page: refused.
        page.locator("#key-name").fill("from-the-console")
        page.locator("#create-key").click()
        secret = page.locator("#secret-value")
        expect(secret).to_have_text(re.compile(r"^cd_\S{40,}$"), timeout=WAIT_MS)
        made = secret.inner_text()
        assert Cyberdesk(api_key=made, endpoint=stack.gateway).instances.list() is not None
        _shot(page, "keys")
        new_row = page.locator("#keys tbody tr", has_text="from-the-console")
        page.once("dialog", lambda dialog: dialog.accept())
        new_row.get_by_role("button", name="Revoke").click()
        expect(new_row).to_contain_text("revoked", timeout=WAIT_MS)
        # Refused once the gateway's auth cache (1 s in this stack) has let go of it.
        deadline = time.monotonic() + 15
        while (status := _request(base + "/v1/instances", headers={"authorization": f"Bearer {made}"})[0]) == 200:
            assert time.monotonic() < deadline, "the revoked key still works"
            time.sleep(0.2)
        assert status == 401
        page.goto(base + "/#/usage")
        expect(page.locator("main h1")).to_have_text("Usage and plan")
        with urllib.request.urlopen(base + "/openapi.json", timeout=30) as response:
            billed = "/v1/plan" in json.loads(response.read())["paths"]
        if billed:  # the gateway serves billing: the plan's limits and this month's usage
            expect(page.locator("#plan")).to_contain_text("Live instances", timeout=WAIT_MS)
            expect(page.locator(f'#usage-instances tr[data-usage="{instance_id}"]')).to_be_visible()
        else:
            expect(page.locator("#usage-missing")).to_have_text(
                "Usage and plan are not available: this gateway does not serve billing."
            )
        _shot(page, "usage")
        page.goto(base + "/#/api")
        op = page.locator('[id="op-InstanceService_ListInstances"]')
        op.locator("summary").click()
        op.locator("button.try").click()
        expect(op.locator("pre.response")).to_contain_text("HTTP 200", timeout=WAIT_MS)
        expect(op.locator("pre.response")).to_contain_text(instance_id)
        _shot(page, "api")

        # Sign out: the session is gone at the gateway, not only in the page.
        page.locator("#sign-out").click()
        expect(page.locator("#sign-in-form")).to_be_visible(timeout=WAIT_MS)
        status, body = _request(base + "/v1/instances", headers={"cookie": jar})
        assert status == 401 and "session has ended" in body["message"], body
        late.delete()
        foreign.delete()
    finally:
        context.close()
        other.close()


def test_revoking_the_key_ends_the_session(browser: Browser, stack: RunningStack, base: str) -> None:
    key_id, secret = _key(stack, "dev")
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = _sign_in(context, base, secret)
        (cookie,) = context.cookies()
        store = KeyStore(store_path(stack.state_dir))
        try:
            store.revoke(key_id)
        finally:
            store.close()
        # The page's open watch is ended by the gateway (the revocation sweep), and the page
        # goes back to sign-in saying why in one sentence.
        message = page.locator("#sign-in-form .error")
        expect(message).to_have_text(re.compile(r"^The console session has ended: .*revoked.*\.$"), timeout=WAIT_MS)
        status, body = _request(base + "/console/session", headers={"cookie": f"cyberdesk_session={cookie['value']}"})
        assert status == 401, body
    finally:
        context.close()


def test_console_files_are_served_with_cache_headers_and_a_strict_csp(base: str) -> None:
    with urllib.request.urlopen(base + "/", timeout=30) as response:
        page = response.read().decode()
        headers = response.headers
    assert headers["cache-control"] == "no-cache" and headers["x-content-type-options"] == "nosniff"
    csp = headers["content-security-policy"]
    host = base.split("://", 1)[1]
    for rule in ("script-src 'self'", f"connect-src 'self' ws://{host} wss://{host}", "frame-ancestors 'none'"):
        assert rule in csp, csp
    assert "<script>" not in page and "unsafe-inline" not in csp.split("script-src", 1)[1].split(";", 1)[0]
    (script,) = re.findall(r'src="(/assets/main-[A-Z0-9]+\.js)"', page)
    with urllib.request.urlopen(base + script, timeout=30) as response:
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert response.headers["content-type"].startswith("text/javascript")
        etag = response.headers["etag"]
    revalidate = urllib.request.Request(base + script, headers={"if-none-match": etag})
    with pytest.raises(urllib.error.HTTPError) as not_modified:
        urllib.request.urlopen(revalidate, timeout=30)
    assert not_modified.value.code == 304
    # Only the built files are served (from memory: no path reaches the disk), and a path that is
    # not the console's is the API's, with its JSON 404.
    for missing in ("/assets/nothing.js", "/assets/../index.html", "/assets/%2e%2e/build.mjs"):
        with pytest.raises(urllib.error.HTTPError) as not_found:
            urllib.request.urlopen(base + missing, timeout=30)
        assert not_found.value.code == 404, missing
    status, body = _request(base + "/v1/nothing")
    assert status == 404 and "message" in body


_COOKIE_ECHO = """
import http.server

class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (self.headers.get("cookie") or "").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.HTTPServer(("127.0.0.1", 8000), Echo).serve_forever()
"""


def test_previews_never_see_the_session_cookie_and_run_sandboxed(
    stack: RunningStack, base: str, admin_key: str
) -> None:
    # A path-form preview shares the console's origin: the gateway strips the session cookie
    # from what it relays to the instance, and sandboxes the page it answers.
    client = Cyberdesk(api_key=admin_key, endpoint=stack.gateway)
    box = client.instances.create(timeout=120)
    try:
        box.files.write("/tmp/echo.py", _COOKIE_ECHO)
        box.start("python3 /tmp/echo.py", tag="echo")
        url = f"{base}/v1/instances/{box.id}/ports/8000/"
        headers = {"x-api-key": admin_key, "cookie": "cyberdesk_session=s3cret; theme=dark"}
        deadline = time.monotonic() + 30
        while True:
            request = urllib.request.Request(url, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    seen, csp = response.read().decode(), response.headers["content-security-policy"]
                break
            except urllib.error.HTTPError as err:
                if err.code != 502 or time.monotonic() > deadline:  # 502: nothing listening yet
                    raise
                time.sleep(0.2)
        assert seen == "theme=dark"
        assert csp.startswith("sandbox ") and "allow-same-origin" not in csp
    finally:
        box.delete()
        client.close()


def test_the_cookie_opens_no_websocket_from_another_origin(base: str, admin_key: str) -> None:
    # Sign in as a script would (no browser: no Origin, so allowed), then try the terminal's
    # WebSocket with the cookie: from another origin refused at the handshake, from the gateway's
    # own origin admitted (a made-up instance: admission passed, so it is the instance's 404).
    sign_in = urllib.request.Request(
        base + "/console/session", data=json.dumps({"apiKey": admin_key}).encode(), method="POST"
    )
    with urllib.request.urlopen(sign_in, timeout=30) as response:
        jar = response.headers["set-cookie"].split(";", 1)[0]
        assert admin_key not in response.read().decode()
    url = base.replace("http", "ws", 1) + "/v1/instances/i-000000000000/pty"
    for origin, status in (("http://evil.example", 403), (base, 404)):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers={"cookie": jar, "origin": origin}, open_timeout=30)
        assert refused.value.response.status_code == status, (origin, refused.value.response.body)
