// examples/quickstart.ts: an instance for the length of a scope, a command, a file.
import { Cyberdesk } from "@cyberdesk/sdk";

// The key and endpoint come from CYBERDESK_API_KEY / CYBERDESK_HTTP_ENDPOINT or the CLI config
// file that `cyberdesk up` writes.
const client = new Cyberdesk();
{
  await using box = await client.instances.create({ timeout: 300, labels: { example: "quickstart" } });
  const result = await box.exec("echo hello from $(uname -s)");
  console.log(result.exitCode, result.stdoutText.trim());

  await box.files.write("/tmp/note.txt", "written from TypeScript");
  console.log(await box.files.readText("/tmp/note.txt"));
} // the instance is deleted here
