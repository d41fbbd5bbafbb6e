// examples/transfer.ts: a local file up and back, streamed, with progress and sha256.
import { createHash } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { Cyberdesk } from "@cyberdesk/sdk";

const dir = await mkdtemp(join(tmpdir(), "cyberdesk-example-"));
const client = new Cyberdesk();
try {
  await using box = await client.instances.create();
  const local = join(dir, "data.bin");
  await writeFile(local, new Uint8Array(8 * 1024 * 1024).fill(7));

  let percent = 0;
  const up = await box.files.uploadFile(local, "/tmp/data.bin", {
    progress: (done, total) => (percent = Math.round((100 * done) / (total ?? done))),
  });
  console.log("uploaded", up.size, "bytes", `${percent}%`);

  const down = await box.files.downloadFile("/tmp/data.bin", join(dir, "back.bin"), { verify: true });
  const local256 = createHash("sha256").update(await readFile(join(dir, "back.bin"))).digest("hex");
  console.log("sha256 matches:", up.sha256 === down.sha256 && down.sha256 === local256);
} finally {
  await rm(dir, { recursive: true, force: true });
}
