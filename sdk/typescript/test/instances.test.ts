/** Instances, snapshots, configuration and errors against the real stack. */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  Cyberdesk,
  ConfigurationError,
  CyberdeskError,
  type Instance,
  InvalidArgument,
  NotFound,
  RateLimited,
  Unauthenticated,
  resolveConfig,
} from "../src/index.js";
import { CONFIG_FILE, ENDPOINT, KEY, LIMITED_KEY, OTHER_KEY, client } from "./support.js";

const cd = client();
let box: Instance;
// Unique to this run, so that counting by label sees only this run's instances.
const SUITE = `ts-instances-${Date.now().toString(36)}`;

before(async () => {
  box = await cd.instances.create({ timeout: 600, labels: { suite: SUITE }, env: { FROM_CREATE: "yes" } });
});
after(async () => {
  await box?.delete();
});

describe("configuration", () => {
  test("explicit options, then the environment, then the config file", async () => {
    const saved = { ...process.env };
    try {
      assert.deepEqual(await resolveConfig("cd_x", "127.0.0.1:1"), { apiKey: "cd_x", httpEndpoint: "http://127.0.0.1:1" });
      assert.deepEqual(await resolveConfig(), { apiKey: KEY, httpEndpoint: ENDPOINT });
      delete process.env["CYBERDESK_API_KEY"];
      delete process.env["CYBERDESK_HTTP_ENDPOINT"];
      process.env["CYBERDESK_CONFIG"] = CONFIG_FILE;
      const fromFile = new Cyberdesk();
      assert.deepEqual(await fromFile.config(), { apiKey: KEY, httpEndpoint: ENDPOINT });
      assert.equal((await fromFile.instances.get(box.id)).id, box.id);
      process.env["CYBERDESK_CONFIG"] = "/nonexistent/config.json";
      await assert.rejects(new Cyberdesk().instances.list(), (err: unknown) => {
        assert.ok(err instanceof ConfigurationError);
        assert.match(err.message, /no API key: pass apiKey, set CYBERDESK_API_KEY/);
        return true;
      });
    } finally {
      for (const name of Object.keys(process.env)) if (!(name in saved)) delete process.env[name];
      Object.assign(process.env, saved);
    }
  });
});

describe("instances", () => {
  test("create with options, get, list with filters and pages", async () => {
    assert.equal(box.state, "RUNNING");
    assert.deepEqual(box.data.labels, { suite: SUITE });
    assert.equal((await box.exec("echo $FROM_CREATE")).stdoutText, "yes\n");
    const second = await cd.instances.create({ labels: { suite: SUITE, n: "2" }, diskMib: 512, vcpus: 1, memoryMib: 512 });
    try {
      assert.equal(second.data.diskMib, 512);
      const got = await cd.instances.get(second.id);
      assert.equal(got.state, "RUNNING");
      assert.equal(got.data.memoryMib, 512);
      const labelled = await cd.instances.list({ labels: { suite: SUITE }, states: ["running"] });
      assert.deepEqual(new Set(labelled.map((i) => i.id)), new Set([box.id, second.id]));
      // One per page: the token leads to the next page, and `list` walks every page.
      const first = await cd.instances.listPage({ labels: { suite: SUITE }, pageSize: 1 });
      assert.equal(first.instances.length, 1);
      assert.ok(first.nextPageToken);
      const next = await cd.instances.listPage({ labels: { suite: SUITE }, pageSize: 1, pageToken: first.nextPageToken });
      assert.equal(next.instances.length, 1);
      assert.notEqual(next.instances[0]!.id, first.instances[0]!.id);
      assert.equal((await cd.instances.list({ labels: { suite: SUITE }, pageSize: 1 })).length, 2);
      assert.deepEqual((await cd.instances.list({ labels: { suite: SUITE, n: "2" } })).map((i) => i.id), [second.id]);
      await assert.rejects(cd.instances.list({ states: ["SLEEPY"] }), InvalidArgument);
    } finally {
      await cd.instances.delete(second.id);
    }
    assert.equal((await cd.instances.get(second.id)).state, "TERMINATED");
  });

  test("allow/deny without internet is refused before any call", async () => {
    await assert.rejects(cd.instances.create({ allow: ["pypi.org"] }), /allow needs internet: true/);
  });

  test("timeout, pause and resume, watched as they happen; a cursor replays", async () => {
    const before = box.data.expireTime!;
    await box.setTimeout(900);
    assert.ok(Date.parse(box.data.expireTime!) > Date.parse(before));
    const watch = await cd.instances.watch({ instanceId: box.id });
    const seen: { change: string; cursor: string }[] = [];
    const watching = (async () => {
      for await (const event of watch) {
        assert.equal(event.instance.instanceId, box.id);
        seen.push({ change: `${event.previousState}->${event.state}`, cursor: event.cursor });
        if (event.previousState === "PAUSED" && event.state === "RUNNING") return;
      }
    })();
    // watch() returns once the server's watch is in place: one pause and one resume are both seen.
    await box.pause();
    assert.equal(box.state, "PAUSED");
    await box.resume();
    assert.equal(box.state, "RUNNING");
    await watching;
    await watch.close();
    assert.deepEqual(
      seen.map((e) => e.change),
      ["RUNNING->PAUSED", "PAUSED->RUNNING"],
    );
    // From the cursor of that pause, a new watch replays what came after it: the resume.
    await using again = await cd.instances.watch({ instanceId: box.id, cursor: seen[0]!.cursor });
    for await (const event of again) {
      assert.equal(`${event.previousState}->${event.state}`, "PAUSED->RUNNING");
      assert.equal(event.cursor, seen[1]!.cursor);
      break;
    }
    assert.equal((await box.exec("echo alive")).stdoutText, "alive\n");
  });

  test("a handle by id works at once; refresh reads it", async () => {
    const handle = cd.instances.handle(box.id);
    assert.equal(handle.state, "UNKNOWN");
    assert.equal((await handle.exec("echo by-id")).stdoutText, "by-id\n");
    assert.equal((await handle.refresh()).state, "RUNNING");
  });

  test("await using deletes the instance when the scope ends", async () => {
    let id = "";
    {
      await using scoped = await cd.instances.create();
      id = scoped.id;
      assert.equal(scoped.state, "RUNNING");
    }
    assert.equal((await cd.instances.get(id)).state, "TERMINATED");
  });

  test("snapshots: take, list, get, restore into a new instance, delete", async () => {
    await box.files.write("/home/user/kept.txt", "kept");
    const snap = await box.snapshot("ts");
    assert.equal(snap.instanceId, box.id);
    assert.ok((await cd.snapshots.list({ instanceId: box.id })).some((s) => s.id === snap.id));
    assert.equal((await cd.snapshots.get(snap.id)).displayName, "ts");
    {
      await using restored = await cd.instances.create({ snapshotId: snap.id });
      assert.equal(await restored.files.readText("/home/user/kept.txt"), "kept");
    }
    await cd.snapshots.delete(snap.id);
    assert.ok(!(await cd.snapshots.list()).some((s) => s.id === snap.id));
    await assert.rejects(cd.snapshots.get(snap.id), NotFound);
  });
});

describe("errors", () => {
  test("another tenant's instance is NotFound, on every face", async () => {
    const other = new Cyberdesk({ apiKey: OTHER_KEY, httpEndpoint: ENDPOINT });
    const theirs = other.instances.handle(box.id);
    await assert.rejects(other.instances.get(box.id), (err: unknown) => {
      assert.ok(err instanceof NotFound);
      assert.equal(err.code, "NOT_FOUND");
      assert.equal(err.httpStatus, 404);
      assert.match(err.serverMessage, /not found/);
      return true;
    });
    await assert.rejects(theirs.exec("true"), NotFound);
    await assert.rejects(theirs.files.read("/etc/hostname"), NotFound);
    await assert.rejects(theirs.shell(), NotFound);
    assert.ok(!(await other.instances.list()).some((i) => i.id === box.id));
  });

  test("a bad key is Unauthenticated (a call and a terminal's handshake)", async () => {
    const bad = new Cyberdesk({ apiKey: "cd_wrong", httpEndpoint: ENDPOINT });
    await assert.rejects(bad.instances.list(), (err: unknown) => err instanceof Unauthenticated && err.code === "UNAUTHENTICATED");
    await assert.rejects(bad.instances.handle(box.id).shell(), Unauthenticated);
  });

  test("RateLimited carries retryAfter", async () => {
    const limited = new Cyberdesk({ apiKey: LIMITED_KEY, httpEndpoint: ENDPOINT });
    await limited.instances.list();
    await assert.rejects(limited.instances.list(), (err: unknown) => {
      assert.ok(err instanceof RateLimited, String(err));
      assert.equal(err.code, "RESOURCE_EXHAUSTED");
      assert.ok(err.retryAfter !== undefined && err.retryAfter > 0, `retryAfter ${err.retryAfter}`);
      return true;
    });
  });

  test("an unreachable endpoint is Unavailable; an aborted call rejects with the signal's reason", async () => {
    const nowhere = new Cyberdesk({ apiKey: KEY, httpEndpoint: "http://127.0.0.1:9" });
    await assert.rejects(nowhere.instances.list(), (err: unknown) => err instanceof CyberdeskError && err.code === "UNAVAILABLE");
    const aborted = AbortSignal.abort();
    await assert.rejects(cd.instances.list({ signal: aborted }), { name: "AbortError" });
  });
});
