/** Processes against the real stack: whole results, streams, background, stdin, signals. */

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { type ExecEvent, type Instance, InvalidArgument, NotFound } from "../src/index.js";
import { client, eventually, text } from "./support.js";

const cd = client();
let box: Instance;

before(async () => {
  box = await cd.instances.create({ timeout: 600, labels: { suite: "ts-exec" } });
});
after(async () => {
  await box?.delete();
});

test("exec: the whole result in one call", async () => {
  const result = await box.exec("echo out; echo err >&2; exit 3");
  assert.equal(result.exitCode, 3);
  assert.equal(result.stdoutText, "out\n");
  assert.equal(result.stderrText, "err\n");
  assert.ok(result.pid > 0 && !result.ok && !result.truncated);
  assert.equal((await box.exec(["tr", "a-z", "A-Z"], { stdin: "hello" })).stdoutText, "HELLO");
  assert.equal((await box.exec("echo $X; pwd", { env: { X: "from-env" }, cwd: "/tmp" })).stdoutText, "from-env\n/tmp\n");
  assert.equal((await box.exec(["no-such-command-xyz"])).exitCode, 127);
  const timed = await box.exec("sleep 20", { timeout: 0.5 });
  assert.ok(timed.timedOut && !timed.ok);
  await assert.rejects(box.exec(""), InvalidArgument);
});

test("exec with callbacks takes the streaming path and drops nothing", async () => {
  const sizes: number[] = [];
  const whole = await box.exec("head -c 16777216 /dev/zero", { onStdout: (d) => sizes.push(d.length) });
  assert.ok(whole.ok && !whole.truncated);
  assert.equal(whole.stdout.length, 16 * 1024 * 1024);
  assert.equal(sizes.reduce((a, b) => a + b, 0), 16 * 1024 * 1024);
  const capped = await box.exec("head -c 16777216 /dev/zero");
  assert.ok(capped.truncated && capped.stdout.length === 15 * 1024 * 1024);
});

test("execStream: events in order", async () => {
  const events: ExecEvent[] = [];
  for await (const event of box.execStream("echo a; echo b >&2; exit 4")) events.push(event);
  const first = events[0]!;
  const last = events.at(-1)!;
  assert.ok(first.type === "started" && first.pid > 0);
  assert.ok(last.type === "exited" && last.exitCode === 4);
  const out = events.flatMap((e) => (e.type === "stdout" ? [text(e.data)] : [])).join("");
  const err = events.flatMap((e) => (e.type === "stderr" ? [text(e.data)] : [])).join("");
  assert.equal(out, "a\n");
  assert.equal(err, "b\n");
});

test("leaving an execStream early kills the command", async () => {
  let pid = 0;
  for await (const event of box.execStream("while true; do echo tick; sleep 0.05; done")) {
    if (event.type === "started") pid = event.pid;
    if (event.type === "stdout") break; // the caller is done with it
  }
  assert.ok(pid > 0);
  const exit = await eventually(async () => (await box.processes()).find((p) => p.pid === pid && p.exited)?.exited, "the command's exit");
  // The agent ends a command whose (foreground) stream went away, and says why.
  assert.ok(exit.signal !== 0, `exit ${JSON.stringify(exit)}`);
  assert.match(exit.error, /ended before the process did/);
});

test("aborting an exec kills the command; the signal's reason is thrown", async () => {
  const reason = new Error("caller gave up");
  const controller = new AbortController();
  const pending = box.exec("echo $$ > /tmp/aborted.pid; exec sleep 300", { signal: controller.signal });
  const pid = Number(
    await eventually(async () => {
      const r = await box.exec("cat /tmp/aborted.pid 2>/dev/null");
      return r.stdoutText.trim() || undefined;
    }, "the command's pid file"),
  );
  controller.abort(reason);
  await assert.rejects(pending, (err: unknown) => err === reason);
  await eventually(async () => ((await box.exec(`kill -0 ${pid}`)).exitCode !== 0 ? true : undefined), "the aborted command's end");
});

test("background: start, reattach by pid and by tag, stdin, wait", async () => {
  const job = await box.start("read line; echo got:$line; echo end", { tag: "bg-ts", keepStdinOpen: true });
  assert.ok(job.pid > 0);
  assert.equal(job.tag, "bg-ts");
  await box.connect({ pid: job.pid }).sendStdin("hello\n");
  const result = await box.connect({ tag: "bg-ts" }).wait();
  assert.equal(result.exitCode, 0);
  assert.equal(result.stdoutText, "got:hello\nend\n");
  assert.ok((await box.processes()).some((p) => p.pid === job.pid && p.background));
  // Replay: reattaching after the end still hands out the buffered output.
  const replay: string[] = [];
  for await (const e of box.connect({ pid: job.pid }).events()) if (e.type === "stdout") replay.push(text(e.data));
  assert.equal(replay.join(""), "got:hello\nend\n");
  assert.throws(() => box.connect({ tag: "" }), InvalidArgument);
  await assert.rejects(box.connect({ tag: "no-such-tag" }).wait(), NotFound);
});

test("stdin streamed in one request, in order", async () => {
  const cat = await box.start(["cat"], { keepStdinOpen: true });
  async function* lines(): AsyncGenerator<string> {
    for (let i = 0; i < 100; i++) yield `line ${i}\n`;
  }
  const written = await cat.streamStdin(lines());
  const expected = Array.from({ length: 100 }, (_, i) => `line ${i}\n`).join("");
  assert.equal(written, expected.length);
  await cat.closeStdin();
  assert.equal((await cat.wait()).stdoutText, expected);
  await assert.rejects(box.connect({ tag: "x" }).streamStdin(lines()), InvalidArgument);
});

test("stdin: close to end the input; signals by name and number", async () => {
  // No initial `stdin` here: with it, a background cat was once found exited at the first
  // sendStdin (1 run in about 5 of this file, never in 120 tries alone); reported as a
  // suspected agent race between the initial write and the start stream's end.
  const cat = await box.start(["cat"], { keepStdinOpen: true });
  await cat.sendStdin("one\n");
  await cat.sendStdin(new TextEncoder().encode("two\n"));
  await cat.closeStdin();
  const done = await cat.wait();
  assert.equal(done.stdoutText, "one\ntwo\n");
  assert.equal(done.exitCode, 0);
  const sleeper = await box.start("exec sleep 60", { tag: "sleeper" });
  await box.connect({ tag: "sleeper" }).signal("SIGTERM");
  assert.equal((await sleeper.wait()).signal, 15);
  // An argv, not a command line: a non-interactive bash catches SIGINT, and one that arrives just
  // before its `exec` is dropped (the interrupt is only a flag then; the exec'd sleep never sees it).
  // Seen once in CI; on this machine 13 of 320 `bash -lc "exec sleep 3"` outlived a SIGINT sent 4-11 ms
  // after the spawn, none of 320 a SIGTERM, none of 320 for dash.
  const other = await box.start(["sleep", "60"]);
  await other.signal(2);
  assert.equal((await other.wait()).signal, 2);
  const killed = await box.start("exec sleep 60");
  await killed.kill();
  assert.equal((await killed.wait()).signal, 9);
  await assert.rejects(killed.signal("NOPE"), InvalidArgument);
});
