/** The package's examples run against the real stack, and the README shows them as they are. */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFile, readdir } from "node:fs/promises";
import { test } from "node:test";
import { promisify } from "node:util";

const run = promisify(execFile);
const ROOT = new URL("../../", import.meta.url); // dist/test/ -> the package

const EXPECTED: Record<string, RegExp[]> = {
  quickstart: [/^0 hello from Linux$/m, /^written from TypeScript$/m],
  streaming: [/^line 1\nline 2\nline 3\nexit code 2$/m, /^true done in the background$/m, /^aborted: TimeoutError$/m, /^not found: NOT_FOUND$/m],
  shell: [/^true exit code 3$/m],
  transfer: [/^uploaded 8388608 bytes 100%$/m, /^sha256 matches: true$/m],
  browser: [/^screenshot 800 600 true$/m],
};

test("every example is listed here", async () => {
  const names = (await readdir(new URL("examples/", ROOT))).filter((n) => n.endsWith(".ts")).map((n) => n.slice(0, -3));
  assert.deepEqual(names.sort(), Object.keys(EXPECTED).sort());
});

for (const [name, patterns] of Object.entries(EXPECTED)) {
  test(`example ${name} runs and prints what it says`, async () => {
    const { stdout } = await run(process.execPath, [new URL(`dist/examples/${name}.js`, ROOT).pathname], { env: process.env });
    for (const pattern of patterns) assert.match(stdout, pattern);
  });
}

test("the README's code blocks are the example files", async () => {
  const readme = await readFile(new URL("README.md", ROOT), "utf8");
  const blocks = [...readme.matchAll(/```ts\n(\/\/ examples\/(\w+)\.ts[^\n]*\n[\s\S]*?)```/g)];
  assert.ok(blocks.length >= 3, "the README shows the examples");
  for (const [, body, name] of blocks) {
    const file = await readFile(new URL(`examples/${name}.ts`, ROOT), "utf8");
    assert.equal(body, file, `README block of examples/${name}.ts differs from the file`);
  }
});
