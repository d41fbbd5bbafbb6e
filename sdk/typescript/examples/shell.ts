// examples/shell.ts: an interactive terminal over the WebSocket face.
import { Cyberdesk } from "@cyberdesk/sdk";

const client = new Cyberdesk();
await using box = await client.instances.create();
await using shell = await box.shell({ cols: 100, rows: 30 });
shell.send("stty size; exit 3\n");
let output = "";
for await (const chunk of shell) output += new TextDecoder().decode(chunk);
console.log(output.includes("30 100"), "exit code", shell.exitCode);
