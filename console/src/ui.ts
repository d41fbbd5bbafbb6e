/**
 * DOM helpers. Every text a page shows goes in as a text node (never as HTML), so nothing an
 * instance, a file name or an error message contains can run as script.
 */

import { CyberdeskError } from "@cyberdesk/sdk";

type Child = Node | string | number | null | undefined | false;
type Attrs = Record<string, string | number | boolean | EventListener | null | undefined>;

/** `h("button", { class: "x", onclick: fn }, "text", child)`: an element. */
export function h<K extends keyof HTMLElementTagNameMap>(tag: K, attrs: Attrs = {}, ...children: Child[]): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, ...children);
  return el;
}

export function append(el: Node, ...children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    el.appendChild(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
  }
}

/** Replace the children of `el`. */
export function replace(el: Element, ...children: Child[]): void {
  el.replaceChildren();
  append(el, ...children);
}

/** One clear sentence for any failure: capitalised, ending with a full stop. */
export function sentence(err: unknown): string {
  let text: string;
  if (err instanceof CyberdeskError) {
    const message = err.serverMessage || err.message;
    text = err.code === "UNAVAILABLE" && /endpoint cannot be reached/i.test(message) ? "the gateway cannot be reached; check that it is running" : message;
  } else if (err instanceof Error) {
    text = err.name === "AbortError" ? "the request was cancelled" : err.message;
  } else {
    text = String(err);
  }
  text = text.trim().replace(/\s+/g, " ");
  if (!text) text = "something went wrong";
  text = text[0]!.toUpperCase() + text.slice(1);
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

/** An error line (role=alert, so screen readers say it at once); empty when `err` is undefined. */
export function errorLine(err?: unknown): HTMLElement {
  const el = h("p", { class: "error", role: "alert" });
  if (err !== undefined) el.textContent = sentence(err);
  return el;
}

/** Show `err` in `el` (an errorLine), or clear it. */
export function showError(el: HTMLElement, err?: unknown): void {
  el.textContent = err === undefined ? "" : sentence(err);
}

/**
 * A piece of long work with its progress shown in `where`: an indeterminate bar with a label
 * and the seconds elapsed (or a determinate bar when `report` is given numbers). Resolves or
 * rejects as `work` does; the bar is removed either way.
 */
export async function withProgress<T>(
  where: HTMLElement,
  label: string,
  work: (report: (done: number, total?: number) => void) => Promise<T>,
): Promise<T> {
  const bar = h("progress", { "aria-label": label });
  const text = h("span", {}, label);
  const box = h("div", { class: "progress", role: "status" }, bar, text);
  where.replaceChildren(box);
  const started = Date.now();
  const tick = setInterval(() => {
    text.textContent = `${label} (${Math.round((Date.now() - started) / 1000)} s)`;
  }, 1000);
  try {
    return await work((done, total) => {
      if (total && total > 0) {
        bar.max = total;
        bar.value = done;
      }
    });
  } finally {
    clearInterval(tick);
    box.remove();
  }
}

export function bytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = n / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

export function when(time: string | undefined): string {
  if (!time) return "";
  const date = new Date(time);
  return Number.isNaN(date.getTime()) ? time : date.toLocaleString();
}

/** A labelled form field. */
export function field(label: string, input: HTMLElement, hint?: string): HTMLElement {
  return h("label", { class: "field" }, h("span", {}, label), input, hint ? h("small", {}, hint) : null);
}

export function button(text: string, onclick: () => void, attrs: Attrs = {}): HTMLButtonElement {
  return h("button", { type: "button", ...attrs, onclick: () => onclick() }, text);
}

/** Disable `btn` while `work` runs (no double submits). */
export async function busy<T>(btn: HTMLButtonElement, work: () => Promise<T>): Promise<T> {
  btn.disabled = true;
  try {
    return await work();
  } finally {
    btn.disabled = false;
  }
}
