/**
 * The API reference, rendered from the gateway's own OpenAPI document (/openapi.json, generated
 * from the protos): every operation with its parameters and body fields, a curl example and a
 * TypeScript SDK example, and "try it" for JSON calls, sent with this session.
 */

import { handleEnded } from "../main.js";
import { apiFetch } from "../session.js";
import { append, busy, button, errorLine, h, replace, showError } from "../ui.js";

type Schema = { type?: string; $ref?: string; description?: string; properties?: Record<string, Schema>; items?: Schema; enum?: string[] };
type Parameter = { name: string; in: string; required?: boolean; description?: string; schema?: Schema };
type Operation = {
  operationId?: string;
  summary?: string;
  description?: string;
  tags?: string[];
  parameters?: Parameter[];
  requestBody?: { content?: Record<string, { schema?: Schema }> };
  responses?: Record<string, { content?: Record<string, unknown> }>;
};
type Document = { info?: { title?: string; description?: string }; tags?: { name: string; description?: string }[]; paths: Record<string, Record<string, Operation>>; components?: { schemas?: Record<string, Schema> } };

// SDK calls for the operations people use most; the rest have curl (and every SDK method is in sdk/typescript/README.md).
const SDK: Record<string, string> = {
  InstanceService_CreateInstance: "const box = await client.instances.create({ timeout: 600, desktop: true });",
  InstanceService_ListInstances: "const boxes = await client.instances.list({ states: [\"running\"] });",
  InstanceService_GetInstance: "const box = await client.instances.get(\"{instance_id}\");",
  InstanceService_DeleteInstance: "await client.instances.delete(\"{instance_id}\");",
  InstanceService_SetInstanceTimeout: "await client.instances.handle(\"{instance_id}\").setTimeout(3600);",
  InstanceService_PauseInstance: "await client.instances.handle(\"{instance_id}\").pause();",
  InstanceService_ResumeInstance: "await client.instances.handle(\"{instance_id}\").resume();",
  InstanceService_WatchInstances: "for await (const event of await client.instances.watch()) console.log(event.state);",
  InstanceService_CreateSnapshot: "const snap = await client.instances.handle(\"{instance_id}\").snapshot(\"before-upgrade\");",
  InstanceService_ListSnapshots: "const snaps = await client.snapshots.list();",
  ProcessService_RunProcess: "const r = await client.instances.handle(\"{instance_id}\").exec(\"echo hello\");",
  ProcessService_StartProcess: "for await (const ev of client.instances.handle(\"{instance_id}\").execStream(\"make\")) console.log(ev);",
  ProcessService_ListProcesses: "const ps = await client.instances.handle(\"{instance_id}\").processes();",
  ProcessService_ConnectPty: "const term = await client.instances.handle(\"{instance_id}\").shell({ cols: 100, rows: 30 });",
  FilesystemService_UploadFile: "await client.instances.handle(\"{instance_id}\").files.write(\"/home/user/notes.txt\", \"hi\\n\");",
  FilesystemService_DownloadFile: "const text = await client.instances.handle(\"{instance_id}\").files.readText(\"/home/user/notes.txt\");",
  FilesystemService_ListDirectory: "const entries = await client.instances.handle(\"{instance_id}\").files.list(\"/home/user\");",
  FilesystemService_StatPath: "const info = await client.instances.handle(\"{instance_id}\").files.stat(\"/home/user\");",
  DesktopService_TakeScreenshot: "const shot = await client.instances.handle(\"{instance_id}\").desktop.screenshot();",
  DesktopService_ClickMouse: "await client.instances.handle(\"{instance_id}\").desktop.click({ x: 100, y: 200 });",
  DesktopService_TypeText: "await client.instances.handle(\"{instance_id}\").desktop.type(\"hello\");",
  PreviewService_CreatePreviewUrl: "const url = await client.instances.handle(\"{instance_id}\").ports.url(3000, { signed: true });",
  AuthService_CreateKey: "const { key, secret } = await client.keys.create(\"my-tenant\", \"ci\");",
  AuthService_ListKeys: "const keys = await client.keys.list(\"my-tenant\");",
  AuthService_RevokeKey: "await client.keys.revoke(\"{key_id}\");",
};

function kind(op: Operation): "json" | "stream" | "upload" | "download" | "websocket" {
  const body = Object.keys(op.requestBody?.content ?? {});
  const reply = Object.keys(op.responses?.["200"]?.content ?? {});
  if (op.operationId === "ProcessService_ConnectPty" || op.operationId?.includes("desktop:stream")) return "websocket";
  if (body.includes("application/octet-stream")) return "upload";
  if (reply.includes("application/octet-stream")) return "download";
  if (reply.includes("application/x-ndjson") || body.includes("application/x-ndjson")) return "stream";
  return "json";
}

function shellQuote(text: string): string {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

function curl(method: string, path: string, op: Operation, body: string): string {
  const url = `${location.origin}${path.replace(/\{(\w+)[^}]*\}/g, (_, n: string) => `$${n.toUpperCase()}`)}`;
  const lines = [`curl -sS -X ${method.toUpperCase()} -H "Authorization: Bearer $CYBERDESK_API_KEY"`];
  const k = kind(op);
  if (k === "upload") lines.push("  -T ./local-file");
  else if (k === "websocket") return `# a WebSocket: use the SDK's shell(), or websocat with -H "Authorization: Bearer $CYBERDESK_API_KEY"\nwebsocat ${url.replace(/^http/, "ws")}`;
  else if (body && method !== "get" && method !== "delete") lines.push(`  -H 'content-type: application/json' -d ${shellQuote(body)}`);
  if (k === "stream") lines.push("  -N");
  lines.push(`  "${url}"`);
  return lines.join(" \\\n");
}

function schemaOf(doc: Document, schema: Schema | undefined): Schema | undefined {
  if (schema?.$ref) return doc.components?.schemas?.[schema.$ref.replace("#/components/schemas/", "")];
  return schema;
}

function operationView(doc: Document, method: string, path: string, op: Operation): HTMLElement {
  const id = op.operationId ?? `${method} ${path}`;
  const params = op.parameters ?? [];
  const bodySchema = schemaOf(doc, op.requestBody?.content?.["application/json"]?.schema);
  const fields = Object.entries(bodySchema?.properties ?? {});
  const k = kind(op);
  const snippet = SDK[op.operationId ?? ""];
  const details = h("details", { class: "op", id: `op-${id}` }, h("summary", {}, h("span", { class: `method m-${method}` }, method.toUpperCase()), " ", h("code", {}, path), " ", h("span", { class: "muted" }, op.summary ?? "")));
  let filled = false;
  details.addEventListener("toggle", () => {
    if (!details.open || filled) return;
    filled = true;
    const paramRows = [...params, ...fields.map(([name, s]) => ({ name, in: "body", description: s.description ?? "", schema: s }))];
    append(
      details,
      h("p", {}, op.description ?? ""),
      paramRows.length
        ? h(
            "table",
            { class: "list params" },
            h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", { class: "wide" }, "In"), h("th", { class: "wide" }, "Type"), h("th", {}, "Description"))),
            h("tbody", {}, ...paramRows.map((p) => h("tr", {}, h("td", {}, h("code", {}, p.name)), h("td", { class: "wide" }, p.in), h("td", { class: "wide" }, p.schema?.type ?? (p.schema?.$ref ? p.schema.$ref.split(".").pop() : "")), h("td", {}, p.description ?? "")))),
          )
        : null,
      h("h4", {}, "curl"),
      h("pre", {}, h("code", {}, curl(method, path, op, fields.length ? "{}" : ""))),
      h("h4", {}, "TypeScript SDK"),
      h("pre", {}, h("code", {}, `import { Cyberdesk } from "@cyberdesk/sdk";\nconst client = new Cyberdesk(); // CYBERDESK_API_KEY, CYBERDESK_HTTP_ENDPOINT\n${snippet ?? "// no SDK method of its own: use the REST call above"}`)),
      k === "json" ? tryIt(method, path, params, fields.length > 0 || (method !== "get" && method !== "delete")) : h("p", { class: "muted" }, `This is a ${k === "websocket" ? "WebSocket" : k === "stream" ? "streamed" : "raw-bytes"} call: try it with curl or the SDK.`),
    );
  });
  return details;
}

function tryIt(method: string, path: string, params: Parameter[], hasBody: boolean): HTMLElement {
  const inputs = new Map<string, HTMLInputElement>();
  const pathParams = params.filter((p) => p.in === "path");
  const queryParams = params.filter((p) => p.in === "query");
  const controls: HTMLElement[] = [];
  for (const p of [...pathParams, ...queryParams]) {
    const input = h("input", { name: p.name, placeholder: p.in === "path" ? "required" : "optional", "data-param": p.name });
    inputs.set(p.name, input);
    controls.push(h("label", { class: "field" }, h("span", {}, `${p.name} (${p.in})`), input));
  }
  const body = h("textarea", { rows: 4, spellcheck: "false", "aria-label": "JSON body" });
  body.value = "{}";
  const out = h("pre", { class: "response", "aria-live": "polite" });
  const error = errorLine();
  const send: HTMLButtonElement = button("Send", () => {
    showError(error);
    void busy(send, async () => {
      let url = path;
      for (const p of pathParams) {
        const value = inputs.get(p.name)!.value.trim();
        if (!value) throw new Error(`${p.name} is required`);
        url = url.replace(new RegExp(`\\{${p.name}[^}]*\\}`), p.name === "path" ? value.replace(/^\/+/, "").split("/").map(encodeURIComponent).join("/") : encodeURIComponent(value));
      }
      const query = new URLSearchParams();
      for (const p of queryParams) {
        const value = inputs.get(p.name)!.value.trim();
        if (value) query.append(p.name, value);
      }
      if ([...query].length) url += `?${query}`;
      const init: RequestInit = { method: method.toUpperCase() };
      if (hasBody && method !== "get" && method !== "delete") {
        try {
          JSON.parse(body.value || "{}");
        } catch (err) {
          throw new Error(`the body is not JSON (${(err as Error).message})`);
        }
        init.body = body.value || "{}";
        init.headers = { "content-type": "application/json" };
      }
      const started = performance.now();
      const response = await apiFetch(url, init, true);
      const text = await response.text();
      let shown = text;
      try {
        shown = JSON.stringify(JSON.parse(text), null, 2);
      } catch {
        // not JSON: shown as it came
      }
      out.textContent = `HTTP ${response.status} · ${Math.round(performance.now() - started)} ms\n${shown.slice(0, 20000)}`;
    }).catch((err) => {
      if (!handleEnded(err)) showError(error, err);
    });
  }, { class: "try" });
  return h("div", { class: "card try-it" }, h("h4", {}, "Try it (with this session)"), ...controls, hasBody && method !== "get" && method !== "delete" ? h("label", { class: "field" }, h("span", {}, "Body (JSON)"), body) : null, send, error, out);
}

export async function apiPage(main: HTMLElement): Promise<void> {
  const filter = h("input", { type: "search", placeholder: "Filter: instances, exec, files…", "aria-label": "Filter operations", id: "api-filter" });
  const list = h("div", { id: "api-ops" });
  main.append(h("h1", {}, "API reference"), filter, list);
  let doc: Document;
  try {
    const response = await apiFetch("/openapi.json");
    doc = (await response.json()) as Document;
  } catch (err) {
    list.append(errorLine(err));
    return;
  }
  main.insertBefore(h("p", { class: "muted" }, doc.info?.description ?? ""), filter);
  const groups = new Map<string, HTMLElement[]>();
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      if (typeof op !== "object" || !["get", "put", "post", "delete"].includes(method)) continue;
      const tag = op.tags?.[0] ?? "other";
      const view = operationView(doc, method, path, op);
      view.dataset["search"] = `${method} ${path} ${op.summary ?? ""} ${op.operationId ?? ""}`.toLowerCase();
      if (!groups.has(tag)) groups.set(tag, []);
      groups.get(tag)!.push(view);
    }
  }
  const sections: HTMLElement[] = [];
  for (const tag of doc.tags ?? []) {
    const ops = groups.get(tag.name);
    if (!ops) continue;
    sections.push(h("section", { class: "tag-group" }, h("h2", {}, tag.name), h("p", { class: "muted" }, tag.description ?? ""), ...ops));
  }
  replace(list, ...sections);
  filter.addEventListener("input", () => {
    const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    for (const op of list.querySelectorAll<HTMLElement>("details.op")) op.hidden = !words.every((w) => op.dataset["search"]!.includes(w));
  });
}
