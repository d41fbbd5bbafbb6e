/**
 * Usage and plan, from billing_svc through the gateway: `GET /v1/plan` (the plan's limits and how
 * much of each is used now) and `GET /v1/usage` (metered seconds this month, in total and by
 * instance). A gateway without those routes (billing not served) says so in one sentence.
 */

import { handleEnded } from "../main.js";
import { apiFetch } from "../session.js";
import { errorLine, h, replace, when } from "../ui.js";

type Json = Record<string, unknown>;

function num(value: unknown): number {
  return Number(value ?? 0) || 0;
}

function hours(seconds: unknown): string {
  const s = num(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(s < 36_000 ? 1 : 0)} h`;
}

function seconds(duration: unknown): number {
  return typeof duration === "string" ? Number(duration.replace(/s$/, "")) || 0 : 0;
}

async function get(path: string): Promise<Json | undefined> {
  const response = await apiFetch(path, {}, true);
  const body = (await response.json().catch(() => ({}))) as Json;
  if (response.status === 404 && String(body["message"] ?? "").startsWith("no route")) return undefined;
  if (!response.ok) {
    await apiFetch(path); // throws the typed error of the same answer
  }
  return body;
}

function meter(label: string, used: number, limit: number, show: (n: number) => string, unlimited = false): HTMLElement {
  const bar = h("meter", { min: 0, max: Math.max(limit, 1), value: Math.min(used, Math.max(limit, 1)), low: limit * 0.7, high: limit * 0.9, optimum: 0 });
  return h(
    "tr",
    {},
    h("td", {}, label),
    h("td", {}, show(used)),
    h("td", {}, unlimited && limit === 0 ? "unlimited" : show(limit)),
    h("td", { class: "wide" }, unlimited && limit === 0 ? "" : bar),
  );
}

export async function usagePage(main: HTMLElement): Promise<void> {
  main.append(h("h1", {}, "Usage and plan"));
  const body = h("div", { id: "usage" }, h("p", { class: "muted" }, "Loading…"));
  main.append(body);
  let plan: Json | undefined;
  let usage: Json | undefined;
  try {
    [plan, usage] = await Promise.all([get("/v1/plan"), get("/v1/usage")]);
  } catch (err) {
    if (!handleEnded(err)) replace(body, errorLine(err));
    return;
  }
  if (!plan || !usage) {
    replace(body, h("p", { class: "muted", id: "usage-missing" }, "Usage and plan are not available: this gateway does not serve billing."));
    return;
  }
  const p = (plan["plan"] ?? {}) as Json;
  const used = (plan["used"] ?? {}) as Json;
  const mib = (n: number) => `${n} MiB`;
  const count = (n: number) => String(n);
  const total = (usage["total"] ?? {}) as Json;
  const instances = (usage["instances"] ?? []) as Json[];
  replace(
    body,
    h("h2", {}, `Plan: ${String(p["name"] ?? "")}`),
    h(
      "table",
      { class: "list", id: "plan" },
      h("thead", {}, h("tr", {}, h("th", {}, "Limit"), h("th", {}, "Used"), h("th", {}, "Allowed"), h("th", { class: "wide" }, ""))),
      h(
        "tbody",
        {},
        meter("Live instances", num(used["instances"]), num(p["maxInstances"]), count),
        meter("vCPUs", num(used["vcpus"]), num(p["maxVcpus"]), count),
        meter("Memory", num(used["memoryMib"]), num(p["maxMemoryMib"]), mib),
        meter("Disk", num(used["diskMib"]), num(p["maxDiskMib"]), mib),
        meter("Running time this month", num(used["monthlyInstanceSeconds"]), num(p["monthlyInstanceSeconds"]), hours, true),
      ),
    ),
    h(
      "p",
      { class: "muted" },
      `Desktops ${p["desktopsAllowed"] ? "allowed" : "not allowed"} · longest timeout ${hours(seconds(p["maxTimeout"]))}`,
      plan["periodStartTime"] ? ` · month from ${when(String(plan["periodStartTime"]))}` : "",
      used["creditsExhaustedTime"] ? ` · allowance used up at ${when(String(used["creditsExhaustedTime"]))}` : "",
    ),
    h("h2", {}, "Usage this month"),
    h(
      "p",
      { id: "usage-total" },
      `${hours(total["instanceSeconds"])} running · ${hours(total["vcpuSeconds"])} of vCPU · ${num(total["memoryGibSeconds"]).toFixed(0)} GiB·s of memory · ${hours(total["desktopSeconds"])} of desktop · ${hours(total["pausedSeconds"])} paused · ${num(total["diskGibSeconds"]).toFixed(0)} GiB·s of disk`,
    ),
    h(
      "table",
      { class: "list", id: "usage-instances" },
      h("thead", {}, h("tr", {}, h("th", {}, "Instance"), h("th", { class: "wide" }, "Size"), h("th", {}, "Running"), h("th", { class: "wide" }, "Paused"), h("th", {}, "vCPU time"))),
      h(
        "tbody",
        {},
        ...instances.map((i) => {
          const u = (i["usage"] ?? {}) as Json;
          return h(
            "tr",
            { "data-usage": String(i["instanceId"] ?? "") },
            h("td", {}, h("code", {}, String(i["instanceId"] ?? "")), i["open"] ? h("span", { class: "tag" }, "live") : null),
            h("td", { class: "wide" }, `${num(i["vcpus"])} vCPU · ${num(i["memoryMib"])} MiB${i["desktop"] ? " · desktop" : ""}`),
            h("td", {}, hours(u["instanceSeconds"])),
            h("td", { class: "wide" }, hours(u["pausedSeconds"])),
            h("td", {}, hours(u["vcpuSeconds"])),
          );
        }),
      ),
    ),
  );
}
