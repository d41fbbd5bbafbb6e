/** `client.usage()` and `client.plan()` against the real stack (billing_svc behind the gateway's REST face). */

import assert from "node:assert/strict";
import { test } from "node:test";

import { InvalidArgument, NotFound } from "../src/index.js";
import { client } from "./support.js";

test("a running instance's usage is visible while it runs, and the plan counts it", async () => {
  const c = client();
  await using box = await c.instances.create({ timeout: 120 });
  const deadline = Date.now() + 30_000;
  for (;;) {
    const report = await c.usage({ instanceId: box.id });
    const mine = report.instances.find((i) => i.instanceId === box.id);
    if (mine && mine.usage.instanceSeconds >= 1) {
      assert.equal(mine.open, true);
      assert.equal(mine.state, "RUNNING");
      assert.equal(typeof report.total.vcpuSeconds, "number");
      assert.equal(report.total.vcpuSeconds, mine.usage.instanceSeconds * mine.vcpus);
      break;
    }
    assert.ok(Date.now() < deadline, "no usage within 30 s");
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const plan = await c.plan();
  assert.equal(plan.name, "local");
  assert.ok(plan.used.instances >= 1 && plan.used.instances <= plan.maxInstances);
  assert.ok(plan.maxTimeoutSeconds >= 3600);
});

test("usage of an unknown instance is NotFound, a reversed period InvalidArgument", async () => {
  const c = client();
  await assert.rejects(c.usage({ instanceId: "i-000000000000" }), NotFound);
  await assert.rejects(c.usage({ since: new Date("2026-02-01T00:00:00Z"), until: new Date("2026-01-01T00:00:00Z") }), InvalidArgument);
});
