// examples/browser.ts: in a browser there is no environment or config file: pass both options.
// (The same code runs in Node; the key must never be shipped to untrusted users' browsers.)
import { Cyberdesk } from "@cyberdesk/sdk";

const env = (globalThis as { process?: { env: Record<string, string | undefined> } }).process?.env ?? {};
const client = new Cyberdesk({
  apiKey: env["CYBERDESK_API_KEY"] ?? "cd_...",
  httpEndpoint: env["CYBERDESK_HTTP_ENDPOINT"] ?? "https://api.cyberdesk.example",
});
const box = await client.instances.create({ desktop: true, width: 800, height: 600 });
try {
  const shot = await box.desktop.screenshot();
  const url = URL.createObjectURL(new Blob([shot.image as BlobPart], { type: "image/png" }));
  console.log("screenshot", shot.width, shot.height, url.startsWith("blob:"));
} finally {
  await box.delete();
}
