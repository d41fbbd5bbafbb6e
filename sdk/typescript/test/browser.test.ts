/**
 * The SDK in a real browser: headless Debian `chromium` driven by playwright-core (no browser
 * download: `executablePath` is the system's). A page served from another loopback port, i.e.
 * another origin than the gateway's, loads the built ESM SDK (dist/src) and uses it against the
 * real stack; the gateway was started with that origin in CYBERDESK_CORS_ORIGINS
 * (tests/sdk_typescript/test_typescript_sdk.py). A page of a second origin, not allowed, must
 * be refused by the browser: its fetch fails and its WebSocket never opens.
 */

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { type Server, createServer } from "node:http";
import { after, before, test } from "node:test";

import { type Browser, type Page, chromium } from "playwright-core";

import type { Instance } from "../src/index.js";
import { ENDPOINT, KEY, client } from "./support.js";

const CHROMIUM = process.env["CYBERDESK_TEST_CHROMIUM"] || "/usr/bin/chromium";
const PAGE_PORT = Number(process.env["CYBERDESK_TEST_PAGE_PORT"]);
const OTHER_PAGE_PORT = Number(process.env["CYBERDESK_TEST_OTHER_PAGE_PORT"]);
const SDK_DIR = new URL("../src/", import.meta.url); // dist/test/ -> dist/src/, the built ESM SDK

/** A page server: `/` is an empty page, `/sdk/*.js` the built SDK. */
function servePage(port: number): Promise<Server> {
  const server = createServer((request, response) => {
    const path = new URL(request.url ?? "/", "http://page").pathname;
    if (path === "/") {
      response.writeHead(200, { "content-type": "text/html" }).end("<!doctype html><title>cyberdesk browser test</title>");
      return;
    }
    const name = path.startsWith("/sdk/") ? path.slice(5) : "";
    if (!/^[\w/.-]+\.js$/.test(name) || name.includes("..")) {
      response.writeHead(404).end();
      return;
    }
    readFile(new URL(name, SDK_DIR))
      .then((body) => response.writeHead(200, { "content-type": "text/javascript" }).end(body))
      .catch(() => response.writeHead(404).end());
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", () => resolve(server));
  });
}

let browser: Browser;
let servers: Server[] = [];
let box: Instance; // made in Node, for the raw WebSocket checks
const pageErrors: string[] = [];

async function open(port: number): Promise<Page> {
  const page = await browser.newPage();
  page.on("pageerror", (err) => pageErrors.push(String(err)));
  await page.goto(`http://127.0.0.1:${port}/`);
  return page;
}

before(async () => {
  assert.ok(PAGE_PORT && OTHER_PAGE_PORT, "CYBERDESK_TEST_PAGE_PORT and CYBERDESK_TEST_OTHER_PAGE_PORT are set by the driver");
  servers = [await servePage(PAGE_PORT), await servePage(OTHER_PAGE_PORT)];
  // --no-sandbox: CI runs as root, where chromium's own sandbox cannot start.
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox"] });
  box = await client().instances.create({ timeout: 300, labels: { suite: "ts-browser" } });
});
after(async () => {
  await box?.delete();
  await browser?.close();
  for (const server of servers) server.close();
});

/** What a page reports of a raw WebSocket to the PTY: "open", or how it closed. */
async function rawShell(page: Page, instanceId: string): Promise<string> {
  return page.evaluate(
    ({ endpoint, key, id }) =>
      new Promise<string>((resolve) => {
        const ws = new WebSocket(`${endpoint.replace(/^http/, "ws")}/v1/instances/${id}/pty`, ["cyberdesk.v1", `cyberdesk.key.${key}`]);
        ws.onopen = () => {
          resolve(`open ${ws.protocol}`);
          ws.close();
        };
        ws.onclose = (event) => resolve(`closed ${event.code}`);
      }),
    { endpoint: ENDPOINT, key: KEY, id: instanceId },
  );
}

test("a page on an allowed origin: create, exec, a file, a shell over WebSocket, delete", async () => {
  const page = await open(PAGE_PORT);
  const report = await page.evaluate(
    async ({ endpoint, key }) => {
      const url = "/sdk/index.js"; // a variable: the compiler must not resolve the page's import
      const sdk = (await import(url)) as typeof import("../src/index.js");
      const cd = new sdk.Cyberdesk({ apiKey: key, httpEndpoint: endpoint });
      const box = await cd.instances.create({ timeout: 300, labels: { suite: "ts-browser-page" } });
      try {
        const exec = await box.exec("echo hello from $(uname -s); exit 4");
        const written = await box.files.write("/tmp/from-the-browser.txt", "written by chromium");
        const read = await box.files.readText("/tmp/from-the-browser.txt");
        const shell = await box.shell({ cols: 77, rows: 21 });
        shell.send("stty size; echo shell-$((6*7)); exit 5\n");
        let shellOutput = "";
        for await (const chunk of shell) shellOutput += new TextDecoder().decode(chunk);
        return {
          origin: location.origin,
          inNode: typeof (globalThis as { process?: unknown }).process !== "undefined",
          id: box.id,
          state: box.state,
          stdout: exec.stdoutText,
          exitCode: exec.exitCode,
          written: written.size,
          read,
          shellOutput,
          shellExit: shell.exitCode,
        };
      } finally {
        await box.delete();
      }
    },
    { endpoint: ENDPOINT, key: KEY },
  );
  assert.deepEqual(pageErrors, []);
  assert.equal(report.origin, `http://127.0.0.1:${PAGE_PORT}`);
  assert.notEqual(report.origin, new URL(ENDPOINT).origin); // really another origin
  assert.equal(report.inNode, false);
  assert.equal(report.state, "RUNNING");
  assert.equal(report.stdout, "hello from Linux\n");
  assert.equal(report.exitCode, 4);
  assert.equal(report.written, 19);
  assert.equal(report.read, "written by chromium");
  assert.match(report.shellOutput, /21 77/);
  assert.match(report.shellOutput, /shell-42/);
  assert.equal(report.shellExit, 5);
  // The page's delete took effect (seen from Node).
  const gone = await client().instances.get(report.id);
  assert.ok(["STOPPING", "TERMINATED"].includes(gone.state), gone.state);
  assert.equal(await rawShell(page, box.id), "open cyberdesk.v1");
  await page.close();
});

test("a page on an origin that is not allowed is refused by the browser", async () => {
  const page = await open(OTHER_PAGE_PORT);
  const report = await page.evaluate(
    async ({ endpoint, key }) => {
      const url = "/sdk/index.js";
      const sdk = (await import(url)) as typeof import("../src/index.js");
      const out: Record<string, string> = {};
      try {
        const r = await fetch(`${endpoint}/v1/instances`, { headers: { authorization: `Bearer ${key}` } });
        out["fetch"] = `answered ${r.status}`;
      } catch (err) {
        out["fetch"] = (err as Error).name;
      }
      try {
        await new sdk.Cyberdesk({ apiKey: key, httpEndpoint: endpoint }).instances.list();
        out["sdk"] = "answered";
      } catch (err) {
        out["sdk"] = `${(err as Error).name} ${(err as { code?: string }).code}`;
      }
      return out;
    },
    { endpoint: ENDPOINT, key: KEY },
  );
  assert.deepEqual(report, { fetch: "TypeError", sdk: "Unavailable UNAVAILABLE" });
  // The shell's handshake is refused by the gateway (403): the page sees an abnormal close.
  assert.equal(await rawShell(page, box.id), "closed 1006");
  await page.close();
});
