/** `client.keys` against the real stack: the development key is an admin key (`cyberdesk up` makes it so). */

import assert from "node:assert/strict";
import { test } from "node:test";

import { Cyberdesk, InvalidArgument, NotFound, PermissionDenied, Unauthenticated } from "../src/index.js";
import { ENDPOINT, OTHER_KEY, client } from "./support.js";

// Unique to this run, so that the listing holds only this test's keys.
const TENANT = `ts-keys-${Date.now().toString(36)}`;
// The gateway's auth cache bound is 5 s (CYBERDESK_AUTH_CACHE_SECONDS); waited for generously.
const REVOKED_WITHIN_MS = 30_000;

test("an admin key creates a key, lists it, revokes it; the revoked key is Unauthenticated", async () => {
  const admin = client();
  const { key, secret } = await admin.keys.create(TENANT, "made-by-ts", { rateLimit: { limit: 50, windowSeconds: 2 } });
  assert.equal(key.tenantId, TENANT);
  assert.deepEqual(key.scopes, ["instances"]);
  assert.deepEqual(key.rateLimit, { limit: 50, windowSeconds: 2 });
  assert.ok(secret.startsWith(key.prefix) && secret.length > key.prefix.length);
  assert.equal(key.revokeTime, undefined);

  const made = new Cyberdesk({ apiKey: secret, httpEndpoint: ENDPOINT });
  assert.deepEqual(await made.instances.list(), []); // a new tenant: it works, and has nothing

  const listed = await admin.keys.list(TENANT);
  assert.deepEqual(listed.map((k) => [k.keyId, k.name]), [[key.keyId, "made-by-ts"]]);

  const revoked = await admin.keys.revoke(key.keyId);
  assert.equal(revoked.keyId, key.keyId);
  assert.ok(revoked.revokeTime);
  assert.ok((await admin.keys.list(TENANT))[0]!.revokeTime);

  const deadline = Date.now() + REVOKED_WITHIN_MS;
  let last: unknown;
  for (;;) {
    try {
      await made.instances.list();
      last = "still accepted";
    } catch (err) {
      last = err;
      if (err instanceof Unauthenticated) break;
    }
    if (Date.now() > deadline) assert.fail(`the revoked key was not refused within ${REVOKED_WITHIN_MS} ms: ${String(last)}`);
    await new Promise((r) => setTimeout(r, 250));
  }

  await assert.rejects(admin.keys.revoke("k-000000000000"), NotFound);
  await assert.rejects(admin.keys.create(TENANT, "x", { rateLimit: { limit: 0, windowSeconds: 1 } }), InvalidArgument);
});

test("an admin key can make another admin key", async () => {
  const { key, secret } = await client().keys.create(TENANT, "second-admin", { admin: true });
  assert.deepEqual(key.scopes, ["admin", "instances"]);
  const second = new Cyberdesk({ apiKey: secret, httpEndpoint: ENDPOINT });
  assert.ok((await second.keys.list(TENANT)).some((k) => k.keyId === key.keyId));
  await second.keys.revoke(key.keyId); // an admin key may revoke itself
});

test("a key without the admin scope is PermissionDenied on every key call", async () => {
  const plain = new Cyberdesk({ apiKey: OTHER_KEY, httpEndpoint: ENDPOINT });
  for (const call of [() => plain.keys.create(TENANT, "nope"), () => plain.keys.list(TENANT), () => plain.keys.revoke("k-000000000000")]) {
    await assert.rejects(call(), (err: unknown) => {
      assert.ok(err instanceof PermissionDenied, String(err));
      assert.equal(err.httpStatus, 403);
      return true;
    });
  }
});
