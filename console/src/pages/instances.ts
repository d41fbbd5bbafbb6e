/**
 * Instances: the tenant's instances, kept current by the watch stream (every state change as it
 * happens), a form to create one, and each one's actions (open, pause, resume, timeout, delete).
 */

import type { CreateOptions, Instance, InstanceJson } from "@cyberdesk/sdk";
import { go, handleEnded } from "../main.js";
import { client } from "../session.js";
import { busy, button, errorLine, field, h, replace, showError, when, withProgress } from "../ui.js";

const ENDED = new Set(["STATE_TERMINATED", "STATE_FAILED", "INSTANCE_STATE_TERMINATED", "INSTANCE_STATE_FAILED"]);

function short(state: string | undefined): string {
  return (state ?? "UNKNOWN").replace(/^(INSTANCE_)?STATE_/, "");
}

export async function instancesPage(main: HTMLElement): Promise<() => void> {
  const error = errorLine();
  error.id = "instances-error";
  const progress = h("div", {});
  const rows = h("tbody", {});
  const table = h(
    "table",
    { class: "list", id: "instances" },
    h("thead", {}, h("tr", {}, h("th", {}, "Instance"), h("th", {}, "State"), h("th", { class: "wide" }, "Template"), h("th", { class: "wide" }, "Expires"), h("th", {}, "Actions"))),
    rows,
  );
  const empty = h("p", { class: "muted", id: "no-instances" }, "No instances yet: create one above.");
  main.append(h("h1", {}, "Instances"), createForm(progress, error), progress, error, table, empty);

  const known = new Map<string, InstanceJson>();
  const draw = (): void => {
    const live = [...known.values()].filter((i) => !ENDED.has(i.state ?? "")).sort((a, b) => (b.createTime ?? "").localeCompare(a.createTime ?? ""));
    replace(rows, ...live.map((i) => row(i, error)));
    empty.hidden = live.length > 0;
  };

  // The watch first, then the list: a change between the two is not lost (the list is read
  // after the watch is in place, and a later event replaces what the list said).
  const watch = await client.instances.watch();
  for (const box of await client.instances.list()) known.set(box.id, box.data);
  draw();
  void (async () => {
    try {
      for await (const event of watch) {
        const id = event.instance.instanceId;
        if (!id) continue;
        known.set(id, event.instance);
        draw();
      }
    } catch (err) {
      if (!handleEnded(err)) showError(error, err);
    }
  })();
  return () => void watch.close();
}

function row(data: InstanceJson, error: HTMLElement): HTMLElement {
  const id = data.instanceId ?? "";
  const state = short(data.state);
  const box = client.instances.handle(id);
  const act = (label: string, work: (b: Instance) => Promise<unknown>, attrs: Record<string, string> = {}) => {
    const btn: HTMLButtonElement = button(label, () => {
      showError(error);
      void busy(btn, () => work(box)).catch((err) => {
        if (!handleEnded(err)) showError(error, err);
      });
    }, { class: "secondary", ...attrs });
    return btn;
  };
  const timeout = act("Timeout…", async (b) => {
    const answer = prompt("New timeout in seconds from now", "600");
    if (answer === null) return;
    const seconds = Number(answer);
    if (!Number.isFinite(seconds) || seconds <= 0) throw new Error(`the timeout must be a positive number of seconds, not “${answer}”`);
    await b.setTimeout(seconds);
  });
  const actions = h(
    "div",
    { class: "actions" },
    h("a", { href: `#/instances/${encodeURIComponent(id)}`, class: "button", "data-open": id }, "Open"),
    state === "RUNNING" ? act("Pause", (b) => b.pause()) : null,
    state === "PAUSED" ? act("Resume", (b) => b.resume()) : null,
    timeout,
    act("Delete", async (b) => {
      if (confirm(`Delete ${id}? Its files and processes are gone for good.`)) await b.delete();
    }, { class: "danger", "data-delete": id }),
  );
  return h(
    "tr",
    { "data-instance": id },
    h("td", {}, h("code", {}, id), data.desktop?.enabled ? h("span", { class: "tag" }, "desktop") : null),
    h("td", {}, h("span", { class: `state state-${state.toLowerCase()}` }, state)),
    h("td", { class: "wide" }, data.template ?? ""),
    h("td", { class: "wide" }, when(data.expireTime)),
    h("td", {}, actions),
  );
}

function number(name: string, value: string, min = 0): HTMLInputElement {
  return h("input", { type: "number", name, id: `create-${name}`, value, min, inputmode: "numeric" });
}

function createForm(progress: HTMLElement, error: HTMLElement): HTMLElement {
  const template = h("input", { name: "template", id: "create-template", value: "base", list: "templates" });
  const vcpus = number("vcpus", "1", 1);
  const memory = number("memory", "512", 64);
  const disk = number("disk", "2048", 64);
  const timeout = number("timeout", "600", 1);
  const desktop = h("input", { type: "checkbox", name: "desktop", id: "create-desktop" });
  const width = number("width", "1280", 64);
  const height = number("height", "800", 64);
  const internet = h("input", { type: "checkbox", name: "internet", id: "create-internet" });
  const allow = h("input", { name: "allow", id: "create-allow", placeholder: "pypi.org, *.pythonhosted.org" });
  const submit = h("button", { type: "submit", id: "create" }, "Create instance");
  const form = h(
    "form",
    { class: "create grid", id: "create-form" },
    h("datalist", { id: "templates" }, h("option", { value: "base" }), h("option", { value: "desktop" })),
    field("Template", template),
    field("vCPUs", vcpus),
    field("Memory (MiB)", memory),
    field("Disk (MiB)", disk),
    field("Timeout (s)", timeout),
    h("label", { class: "check" }, desktop, "Desktop (X display)"),
    field("Width", width),
    field("Height", height),
    h("label", { class: "check" }, internet, "Internet access"),
    field("Allow only", allow, "Host names, *.domains or CIDRs, comma-separated; empty: anywhere."),
    h("div", { class: "submit" }, submit),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    showError(error);
    const options: CreateOptions = {
      template: template.value.trim() || "base",
      vcpus: Number(vcpus.value) || 0,
      memoryMib: Number(memory.value) || 0,
      diskMib: Number(disk.value) || 0,
      timeout: Number(timeout.value) || 600,
      desktop: desktop.checked,
      internet: internet.checked,
    };
    if (desktop.checked) {
      options.width = Number(width.value) || 0;
      options.height = Number(height.value) || 0;
    }
    const allowed = allow.value.split(",").map((s) => s.trim()).filter(Boolean);
    if (allowed.length) options.allow = allowed;
    void busy(submit, () => withProgress(progress, "Creating the instance…", () => client.instances.create(options)))
      .then((box) => go(`/instances/${encodeURIComponent(box.id)}`))
      .catch((err) => {
        if (!handleEnded(err)) showError(error, err);
      });
  });
  return h("details", { class: "card", id: "create-panel" }, h("summary", {}, "New instance"), form);
}
