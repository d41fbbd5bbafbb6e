// The TypeScript side of bench/typescript_sdk.py: a long-lived process that runs what the Python
// driver asks (one JSON line in, one out), so that both SDKs are measured interleaved, on the same
// stack and instance, without paying Node's start-up per measurement.
import { createInterface } from "node:readline";

import { Cyberdesk } from "@cyberdesk/sdk";

type Request =
  | { op: "exec"; instance: string; n: number }
  | { op: "upload"; instance: string; local: string; remote: string }
  | { op: "download"; instance: string; local: string; remote: string };

const client = new Cyberdesk();

async function handle(request: Request): Promise<unknown> {
  const box = client.instances.handle(request.instance);
  if (request.op === "exec") {
    const samples: number[] = [];
    for (let i = 0; i < request.n; i++) {
      const start = performance.now();
      const result = await box.exec(["echo", "hi"]);
      samples.push(performance.now() - start);
      if (result.stdoutText !== "hi\n") throw new Error(`unexpected output ${JSON.stringify(result.stdoutText)}`);
    }
    return { samples };
  }
  const start = performance.now();
  const done =
    request.op === "upload"
      ? await box.files.uploadFile(request.local, request.remote)
      : await box.files.downloadFile(request.remote, request.local);
  return { seconds: (performance.now() - start) / 1000, size: done.size, sha256: done.sha256 };
}

for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  try {
    process.stdout.write(JSON.stringify(await handle(JSON.parse(line) as Request)) + "\n");
  } catch (err) {
    process.stdout.write(JSON.stringify({ error: String(err) }) + "\n");
  }
}
