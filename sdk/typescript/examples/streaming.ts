// examples/streaming.ts: output as it happens, a background job reattached, typed errors.
import { Cyberdesk, NotFound } from "@cyberdesk/sdk";

const client = new Cyberdesk();
const box = await client.instances.create();
try {
  for await (const event of box.execStream("for i in 1 2 3; do echo line $i; done; exit 2")) {
    if (event.type === "stdout") process.stdout.write(event.data);
    if (event.type === "exited") console.log("exit code", event.exitCode);
  }

  const job = await box.start("sleep 0.2; echo done in the background", { tag: "job" });
  const finished = await box.connect({ tag: "job" }).wait();
  console.log(job.pid > 0, finished.stdoutText.trim());

  // Give up on a command after 200 ms: aborting the call kills the command.
  try {
    await box.exec("sleep 60", { signal: AbortSignal.timeout(200) });
  } catch (err) {
    console.log("aborted:", (err as Error).name);
  }

  try {
    await client.instances.get("i-000000000000");
  } catch (err) {
    if (err instanceof NotFound) console.log("not found:", err.code);
  }
} finally {
  await box.close();
}
