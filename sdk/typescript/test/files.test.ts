/** Files against the real stack: small ones, the tree, a watch, ranges, and 256 MiB both ways. */

import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdtemp, open, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { AlreadyExists, DataLoss, type Instance, InvalidArgument, NotFound, OutOfRange } from "../src/index.js";
import { PureSha256 } from "../src/sha256.js";
import { client, text } from "./support.js";

const cd = client();
let box: Instance;
let scratch: string;

before(async () => {
  box = await cd.instances.create({ timeout: 600, labels: { suite: "ts-files" } });
  scratch = await mkdtemp(join(tmpdir(), "cyberdesk-ts-"));
});
after(async () => {
  await box?.delete();
  await rm(scratch, { recursive: true, force: true });
});

test("write, read, stat, list, mkdir, move, remove", async () => {
  const files = box.files;
  const dir = await files.mkdir("/tmp/ts/a/b");
  assert.equal(dir.type, "directory");
  const written = await files.write("/tmp/ts/a/b/x.txt", "text");
  assert.equal(written.size, 4);
  assert.equal(written.sha256, createHash("sha256").update("text").digest("hex"));
  assert.equal(await files.readText("/tmp/ts/a/b/x.txt"), "text");
  const bytes = new Uint8Array([0, 1, 2, 255]);
  await files.write("/tmp/ts/bin", bytes, { mode: 0o600 });
  assert.deepEqual(await files.read("/tmp/ts/bin"), bytes);
  const info = await files.stat("/tmp/ts/bin");
  assert.equal(info.type, "file");
  assert.equal(info.size, 4);
  assert.equal(info.mode & 0o777, 0o600);
  assert.deepEqual((await files.list("/tmp/ts")).map((e) => e.name).sort(), ["a", "bin"]);
  assert.ok((await files.list("/tmp/ts", { depth: 3 })).some((e) => e.path === "/tmp/ts/a/b/x.txt"));
  await assert.rejects(files.upload("/tmp/ts/bin", "again", { overwrite: false }), AlreadyExists);
  const moved = await files.move("/tmp/ts/a/b/x.txt", "/tmp/ts/y.txt");
  assert.equal(moved.path, "/tmp/ts/y.txt");
  assert.ok(!(await files.exists("/tmp/ts/a/b/x.txt")));
  await files.remove("/tmp/ts/y.txt");
  await assert.rejects(files.stat("/tmp/ts/y.txt"), NotFound);
  await assert.rejects(files.remove("/tmp/ts/a"), (err: unknown) => err instanceof Error && /not empty|directory/i.test(err.message));
  await files.remove("/tmp/ts/a", { recursive: true });
  assert.ok(!(await files.exists("/tmp/ts/a")));
  await assert.rejects(files.readText("relative"), InvalidArgument);
  // A path with spaces and a %: every segment travels encoded, `/` stays a separator.
  await files.write("/tmp/ts/with space %41.txt", "odd");
  assert.equal((await box.exec(["cat", "/tmp/ts/with space %41.txt"])).stdoutText, "odd");
});

test("ranges and the agent's digest", async () => {
  await box.files.write("/tmp/range.txt", "0123456789");
  const chunks: Uint8Array[] = [];
  const gen = box.files.stream("/tmp/range.txt", { offset: 2, length: 5 });
  for (;;) {
    const next = await gen.next();
    if (next.done) {
      assert.equal(next.value.size, 5);
      break;
    }
    chunks.push(next.value);
  }
  assert.equal(chunks.map(text).join(""), "23456");
  assert.equal(text(await readAll(box, "/tmp/range.txt", { offset: 7 })), "789");
  const digest = await box.files.digest("/tmp/range.txt");
  assert.deepEqual(digest, { size: 10, sha256: createHash("sha256").update("0123456789").digest("hex") });
  await assert.rejects(readAll(box, "/tmp/range.txt", { offset: 10 }), OutOfRange);
  // verify: the agent's sha256 (HEAD) against the bytes received, for a range too.
  assert.equal(text(await box.files.read("/tmp/range.txt")), "0123456789");
  const verified = box.files.stream("/tmp/range.txt", { offset: 3, length: 4, verify: true });
  let end;
  while (!(end = await verified.next()).done);
  assert.deepEqual(end.value, { size: 4, sha256: createHash("sha256").update("3456").digest("hex") });
});

test("watch reports a change made after it started", async () => {
  await box.files.mkdir("/tmp/watched");
  await using watch = await box.files.watch("/tmp/watched");
  await box.files.write("/tmp/watched/new.txt", "x");
  let seen;
  for await (const event of watch) {
    if (event.path === "/tmp/watched/new.txt") {
      seen = event;
      break;
    }
  }
  assert.ok(seen && ["create", "modify", "rename"].includes(seen.type), JSON.stringify(seen));
});

test("256 MiB up and down, streamed from and to disk, sha256 and progress", async () => {
  const size = 256 * 1024 * 1024;
  const local = join(scratch, "big.bin");
  const hash = createHash("sha256");
  const out = await open(local, "w");
  // One random 4 MiB block, each copy with its index stamped in: no two blocks are alike (a
  // misplaced block fails the hash) and the machine is spared 256 MiB of randomness.
  const block = randomBytes(4 * 1024 * 1024);
  for (let i = 0; i < size / block.length; i++) {
    block.writeUInt32BE(i, 0);
    hash.update(block);
    await out.write(block);
  }
  await out.close();
  const expected = hash.digest("hex");

  let lastUp = 0;
  const up = await box.files.uploadFile(local, "/tmp/big.bin", { progress: (done, total) => ((lastUp = done), assert.equal(total, size)) });
  assert.deepEqual(up, { path: "/tmp/big.bin", size, sha256: expected });
  assert.equal(lastUp, size);

  let lastDown = 0;
  const back = join(scratch, "back.bin");
  const down = await box.files.downloadFile("/tmp/big.bin", back, { progress: (done) => (lastDown = done) });
  assert.deepEqual(down, { size, sha256: expected });
  assert.equal(lastDown, size);
  assert.equal((await stat(back)).size, size);
  const onDisk = createHash("sha256");
  for await (const chunk of createReadStream(back)) onDisk.update(chunk as Buffer);
  assert.equal(onDisk.digest("hex"), expected);
});

test("a download cut short is DataLoss, never short bytes", async () => {
  // The gateway promises Content-Length bytes; a body that ends before them is a failed transfer.
  // Provoked by truncating the file while it is read: the agent reads past its new end.
  await box.exec("head -c 67108864 /dev/urandom > /tmp/shrinking.bin");
  const gen = box.files.stream("/tmp/shrinking.bin");
  const first = await gen.next();
  assert.ok(!first.done);
  await box.exec("truncate -s 1 /tmp/shrinking.bin");
  await assert.rejects(
    (async () => {
      for (;;) if ((await gen.next()).done) return;
    })(),
    DataLoss,
  );
});

test("the pure SHA-256 (browsers) agrees with node:crypto", () => {
  for (const n of [0, 1, 55, 56, 63, 64, 65, 1000, 100_003]) {
    const data = randomBytes(n);
    const pure = new PureSha256();
    pure.update(data.subarray(0, Math.floor(n / 3)));
    pure.update(data.subarray(Math.floor(n / 3)));
    assert.equal(pure.hex(), createHash("sha256").update(data).digest("hex"), `length ${n}`);
  }
});

async function readAll(instance: Instance, path: string, options: { offset?: number; length?: number }): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  const gen = instance.files.stream(path, options);
  for (;;) {
    const next = await gen.next();
    if (next.done) break;
    parts.push(next.value);
  }
  return Buffer.concat(parts);
}
