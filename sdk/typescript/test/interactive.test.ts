/** Shells over the WebSocket face, the desktop (a real Xvfb) and preview links, against the real stack. */

import assert from "node:assert/strict";
import { inflateSync } from "node:zlib";
import WebSocket from "ws";
import { after, before, test } from "node:test";

import { FailedPrecondition, type Instance, type Shell } from "../src/index.js";
import { KEY, client, eventually, text } from "./support.js";

const cd = client();
let box: Instance;

before(async () => {
  box = await cd.instances.create({ timeout: 600, labels: { suite: "ts-interactive" } });
});
after(async () => {
  await box?.delete();
});

async function until(shell: Shell, needle: string): Promise<string> {
  let seen = "";
  while (!seen.includes(needle)) {
    const chunk = await shell.recv();
    if (chunk.length === 0) throw new Error(`the terminal ended before ${JSON.stringify(needle)}; saw ${JSON.stringify(seen)}`);
    seen += text(chunk);
  }
  return seen;
}

test("a shell: input, output, resize, a signal, exit", async () => {
  await using shell = await box.shell({ cols: 90, rows: 20, env: { GREETING: "hi" } });
  assert.ok(shell.pid > 0);
  await until(shell, "$ ");
  shell.send("stty size; echo $GREETING-$((2+3))\n");
  await until(shell, "hi-5");
  shell.resize(132, 43);
  shell.send("stty size\n");
  await until(shell, "43 132");
  // The signal goes to the terminal's foreground group: sent before bash has started the job, it
  // would reach bash itself (seen under load: bash then read EOF and logged out). So the job says it
  // runs first; the needles are computed ($((...))) so that the terminal's echo of the typed line
  // never matches them.
  shell.send("sh -c 'echo sleeping-$((40+2)); exec sleep 30'\n");
  await until(shell, "sleeping-42");
  shell.signal("INT"); // sleep ends, the shell stays
  shell.send("echo after-int-$((3*3))\n");
  await until(shell, "after-int-9");
  shell.send("exit 7\n");
  const exit = await shell.wait();
  assert.equal(exit?.exitCode, 7);
  assert.equal(shell.exitCode, 7);
});

test("a background terminal outlives its client and is attached again by tag", async () => {
  const first = await box.shell({ argv: ["bash", "--norc", "-i"], tag: "ts-bg", background: true });
  first.send("export MARK=kept\n");
  await first.close();
  await using again = await box.attachShell({ tag: "ts-bg" });
  assert.equal(again.pid, first.pid);
  again.send("echo mark=$MARK; exit 0\n");
  const seen = await until(again, "mark=kept");
  assert.ok(seen.includes("mark=kept"));
  assert.equal((await again.wait())?.exitCode, 0);
});

test("a desktop: screenshot decoded as PNG, mouse, keyboard, cursor", async () => {
  await using desk = await cd.instances.create({ desktop: true, width: 640, height: 480 });
  assert.deepEqual(await desk.desktop.size(), { width: 640, height: 480 });
  const shot = await desk.desktop.screenshot();
  assert.equal(shot.format, "png");
  const png = shot.image;
  assert.deepEqual([...png.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  const view = new DataView(png.buffer, png.byteOffset, png.byteLength);
  assert.equal(new TextDecoder().decode(png.subarray(12, 16)), "IHDR");
  assert.equal(view.getUint32(16), 640);
  assert.equal(view.getUint32(20), 480);
  // The pixel data decompresses (zlib) to rows of 640 RGB(A) pixels plus a filter byte.
  const idat: Uint8Array[] = [];
  for (let at = 8; at < png.length; ) {
    const length = view.getUint32(at);
    const type = new TextDecoder().decode(png.subarray(at + 4, at + 8));
    if (type === "IDAT") idat.push(png.subarray(at + 8, at + 8 + length));
    at += 12 + length;
  }
  const pixels = inflateSync(Buffer.concat(idat));
  const channels = png[25] === 6 ? 4 : 3;
  assert.equal(pixels.length, 480 * (1 + 640 * channels));
  const half = await desk.desktop.screenshot({ scale: 0.5, format: "jpeg", quality: 60 });
  assert.deepEqual([half.format, half.width, half.height], ["jpeg", 320, 240]);
  assert.deepEqual([...half.image.subarray(0, 2)], [0xff, 0xd8]);
  await desk.desktop.move(100, 120);
  assert.deepEqual(await desk.desktop.cursor(), { x: 100, y: 120 });
  await desk.desktop.click({ x: 10, y: 20, button: "left" });
  assert.deepEqual(await desk.desktop.cursor(), { x: 10, y: 20 });
  await desk.desktop.drag([10, 10], [50, 60]);
  assert.deepEqual(await desk.desktop.cursor(), { x: 50, y: 60 });
  await desk.desktop.mouseDown({ button: "right" });
  await desk.desktop.mouseUp({ button: "right" });
  await desk.desktop.scroll("down", 2);
  await desk.desktop.type("hello");
  await desk.desktop.press(["ctrl+a", "Return"]);
  await assert.rejects(box.desktop.screenshot(), FailedPrecondition);
  // The live desktop: a view-only link, and its stream speaks RFB from the instance's x11vnc.
  const link = await desk.desktop.viewerLink({ viewOnly: true, ttl: 60 });
  assert.ok(link.url.includes(`/desktop/${desk.id}#token=`) && link.viewOnly && link.expireTime);
  assert.ok((await desk.desktop.streamUrl()).includes("#token="));
  const greeting = await new Promise<string>((resolve, reject) => {
    const socket = new WebSocket(link.streamUrl, ["binary", `cyberdesk.viewer.${link.token}`]);
    socket.on("message", (data: Buffer) => {
      resolve(data.subarray(0, 12).toString("latin1"));
      socket.close();
    });
    socket.on("error", reject);
  });
  assert.equal(greeting, "RFB 003.008\n");
  await assert.rejects(box.desktop.streamUrl(), FailedPrecondition);
});

test("ports: a server inside is reached through a signed link and with the key", async () => {
  await box.files.write("/tmp/www/index.html", "hello from inside");
  await box.start("cd /tmp/www && exec python3 -m http.server 3000 --bind 127.0.0.1");
  const link = await box.ports.link(3000, { ttl: 60 });
  assert.ok(link.pathUrl.endsWith(`/v1/instances/${box.id}/ports/3000/`));
  assert.ok(link.token && link.expireTime);
  const page = await eventually(async () => {
    const r = await fetch(link.pathUrl, { headers: { "x-cyberdesk-preview-token": link.token } });
    return r.status === 200 ? r.text() : undefined;
  }, "the preview");
  assert.equal(page, "hello from inside");
  const signed = await box.ports.url(3000, { signed: true, pathForm: true, ttl: 60 });
  assert.equal(await (await fetch(signed)).text(), "hello from inside");
  const plain = await box.ports.url(3000, { pathForm: true });
  assert.equal((await fetch(plain)).status, 401);
  assert.equal(await (await fetch(plain, { headers: { authorization: `Bearer ${KEY}` } })).text(), "hello from inside");
});
