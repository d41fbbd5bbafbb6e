/**
 * One instance: its state and actions, and tabs for its live desktop (the gateway's noVNC viewer
 * page in a frame, through a viewer link minted for this session), a terminal (xterm.js over the
 * WebSocket shell), a file browser (upload, download), its processes and screenshots.
 */

import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";
import type { FileInfo, Instance, Shell } from "@cyberdesk/sdk";
import { go, handleEnded } from "../main.js";
import { apiFetch, client } from "../session.js";
import { busy, button, bytes, errorLine, h, replace, sentence, showError, when, withProgress } from "../ui.js";

type Tab = { name: string; label: string; open: (panel: HTMLElement, box: Instance, error: HTMLElement) => Promise<(() => void) | void> };

const TABS: Tab[] = [
  { name: "desktop", label: "Desktop", open: desktopTab },
  { name: "terminal", label: "Terminal", open: terminalTab },
  { name: "files", label: "Files", open: filesTab },
  { name: "processes", label: "Processes", open: processesTab },
  { name: "screenshots", label: "Screenshots", open: screenshotsTab },
];

function failed(error: HTMLElement, err: unknown): void {
  if (!handleEnded(err)) showError(error, err);
}

export async function instancePage(main: HTMLElement, id: string): Promise<() => void> {
  const error = errorLine();
  const box = await client.instances.get(id);
  const state = h("span", { class: "state", id: "instance-state" });
  const setState = (s: string) => {
    state.textContent = s;
    state.className = `state state-${s.toLowerCase()}`;
  };
  const actions = h("div", { class: "actions", id: "instance-actions" });
  const act = (label: string, work: () => Promise<unknown>, attrs: Record<string, string> = {}) => {
    const btn: HTMLButtonElement = button(label, () => {
      showError(error);
      void busy(btn, work).catch((err) => failed(error, err));
    }, { class: "secondary", ...attrs });
    return btn;
  };
  const pause = act("Pause", () => box.pause());
  const resume = act("Resume", () => box.resume());
  actions.append(
    pause,
    resume,
    act("Timeout…", async () => {
      const answer = prompt("New timeout in seconds from now", "600");
      if (answer === null) return;
      const seconds = Number(answer);
      if (!Number.isFinite(seconds) || seconds <= 0) throw new Error(`the timeout must be a positive number of seconds, not “${answer}”`);
      await box.setTimeout(seconds);
    }),
    act("Delete", async () => {
      if (!confirm(`Delete ${id}? Its files and processes are gone for good.`)) return;
      await box.delete();
      go("/instances");
    }, { class: "danger" }),
  );
  const setActions = (s: string) => {
    pause.hidden = s !== "RUNNING";
    resume.hidden = s !== "PAUSED";
  };
  const setStateAndActions = (s: string) => {
    setState(s);
    setActions(s);
  };
  setStateAndActions(box.state);
  const data = box.data;
  main.append(
    h("p", {}, h("a", { href: "#/instances" }, "← Instances")),
    h("h1", {}, h("code", {}, id), " ", state),
    h(
      "p",
      { class: "muted" },
      `${data.template ?? ""} · ${data.vcpus ?? 1} vCPU · ${data.memoryMib ?? 0} MiB`,
      data.desktop?.enabled ? ` · desktop ${data.desktop.width}×${data.desktop.height}` : "",
      data.expireTime ? ` · expires ${when(data.expireTime)}` : "",
    ),
    actions,
    error,
  );
  const tabs = h("div", { class: "tabs", role: "tablist" });
  const panel = h("section", { class: "panel", role: "tabpanel" });
  main.append(tabs, panel);
  let closeTab: (() => void) | void;
  let current: Tab | undefined;
  const choose = async (tab: Tab) => {
    current = tab;
    closeTab?.();
    closeTab = undefined;
    for (const b of tabs.children) b.setAttribute("aria-selected", String((b as HTMLElement).dataset["tab"] === tab.name));
    panel.replaceChildren();
    showError(error);
    try {
      closeTab = await tab.open(panel, box, error);
    } catch (err) {
      failed(error, err);
    }
  };
  for (const tab of TABS) {
    tabs.append(button(tab.label, () => void choose(tab), { role: "tab", "data-tab": tab.name, id: `tab-${tab.name}` }));
  }
  // Live state: the watch of this instance.
  const watch = await client.instances.watch({ instanceId: id });
  void (async () => {
    try {
      for await (const event of watch) {
        setStateAndActions(event.state);
        // A pause froze the desktop's VNC server and the viewer lost its stream: connect anew.
        if (event.state === "RUNNING" && event.previousState === "PAUSED" && current?.name === "desktop") void choose(current);
      }
    } catch (err) {
      failed(error, err);
    }
  })();
  await choose(data.desktop?.enabled ? TABS[0]! : TABS[1]!);
  return () => {
    closeTab?.();
    void watch.close();
  };
}

// --- desktop ----------------------------------------------------------------------------------

async function desktopTab(panel: HTMLElement, box: Instance): Promise<void> {
  if (!box.data.desktop?.enabled) {
    panel.append(h("p", { class: "muted" }, "This instance has no desktop: create one with “Desktop” ticked to see it here."));
    return;
  }
  const viewOnly = h("input", { type: "checkbox", id: "view-only" });
  const frameBox = h("div", { class: "viewer" });
  const status = h("div", {});
  const show = async () => {
    // A viewer link minted for this session (the cookie and its CSRF token): its token lives in
    // the URL's fragment, which the browser never sends to any server.
    const reply = await withProgress(status, "Connecting to the desktop…", async () => {
      const response = await apiFetch(`/v1/instances/${encodeURIComponent(box.id)}/desktopViewerUrls`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ viewOnly: viewOnly.checked, ttl: "3600s" }),
      });
      return (await response.json()) as { url?: string };
    });
    const url = new URL(reply.url ?? "", location.origin);
    // The page of this very gateway, whatever public URL it names (the frame must be same-origin).
    const src = `${location.origin}${url.pathname}${url.search}${url.hash}`;
    replace(frameBox, h("iframe", { src, title: `Desktop of ${box.id}`, id: "desktop-viewer", allow: "clipboard-read; clipboard-write" }));
  };
  viewOnly.addEventListener("change", () => void show().catch((err) => replace(status, errorLine(err))));
  panel.append(h("label", { class: "check" }, viewOnly, "View only (no mouse or keyboard)"), status, frameBox);
  await show();
}

// --- terminal ---------------------------------------------------------------------------------

async function terminalTab(panel: HTMLElement, box: Instance, error: HTMLElement): Promise<() => void> {
  const holder = h("div", { class: "terminal", id: "terminal" });
  const status = h("p", { class: "muted", id: "terminal-status" }, "Connecting…");
  panel.append(holder, status);
  const term = new Terminal({ cursorBlink: true, fontSize: 14, convertEol: false, scrollback: 5000 });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(holder);
  fit.fit();
  let shell: Shell | undefined;
  let closed = false;
  const connect = async () => {
    status.textContent = "Connecting…";
    shell = await client.instances.handle(box.id).shell({ cols: term.cols, rows: term.rows });
    status.textContent = `Connected (pid ${shell.pid}).`;
    term.focus();
    const decoder = new TextDecoder();
    for (;;) {
      let chunk: Uint8Array;
      try {
        chunk = await shell.recv();
      } catch (err) {
        if (!closed) failed(error, err);
        break;
      }
      if (chunk.length === 0) break;
      term.write(decoder.decode(chunk, { stream: true }));
    }
    if (!closed) {
      const again = button("Reconnect", () => {
        again.remove();
        void connect().catch((err) => failed(error, err));
      });
      replace(status, `The terminal ended${shell.exitCode !== undefined ? ` (exit code ${shell.exitCode})` : ""}. `, again);
    }
  };
  const input = term.onData((data) => {
    try {
      shell?.send(data);
    } catch (err) {
      status.textContent = sentence(err);
    }
  });
  const resize = new ResizeObserver(() => {
    fit.fit();
    try {
      shell?.resize(term.cols, term.rows);
    } catch {
      // closed: nothing to resize
    }
  });
  resize.observe(holder);
  void connect().catch((err) => {
    status.textContent = "Not connected.";
    failed(error, err);
  });
  return () => {
    closed = true;
    resize.disconnect();
    input.dispose();
    void shell?.close();
    term.dispose();
  };
}

// --- files ------------------------------------------------------------------------------------

function join(dir: string, name: string): string {
  return `${dir.replace(/\/+$/, "")}/${name}`;
}

function parent(dir: string): string {
  const up = dir.replace(/\/+$/, "").replace(/\/[^/]*$/, "");
  return up || "/";
}

/** The download URL of a file: the gateway's raw GET, which the session cookie admits. */
function downloadUrl(id: string, path: string): string {
  return `/v1/instances/${encodeURIComponent(id)}/files/${path.replace(/^\/+/, "").split("/").map(encodeURIComponent).join("/")}`;
}

async function filesTab(panel: HTMLElement, box: Instance, error: HTMLElement): Promise<void> {
  const files = client.instances.handle(box.id).files;
  const where = h("input", { id: "files-path", value: "/home/user", "aria-label": "Directory" });
  const list = h("tbody", {});
  const progress = h("div", {});
  const upload = h("input", { type: "file", id: "files-upload", multiple: true });
  let dir = "/home/user";
  const load = async (path: string) => {
    showError(error);
    const entries = await files.list(path);
    dir = path;
    where.value = path;
    entries.sort((a, b) => (a.type === "directory" ? 0 : 1) - (b.type === "directory" ? 0 : 1) || a.name.localeCompare(b.name));
    const rows: HTMLElement[] = [];
    if (path !== "/") rows.push(h("tr", {}, h("td", {}, h("a", { href: "#", "data-dir": parent(path), onclick: open(parent(path)) }, "..")), h("td", {}), h("td", { class: "wide" }), h("td", {})));
    for (const entry of entries) rows.push(fileRow(entry));
    replace(list, ...rows);
  };
  const open = (path: string) => (event: Event) => {
    event.preventDefault();
    void load(path).catch((err) => failed(error, err));
  };
  const fileRow = (entry: FileInfo): HTMLElement => {
    const path = entry.path || join(dir, entry.name);
    const name =
      entry.type === "directory"
        ? h("a", { href: "#", "data-dir": path, onclick: open(path) }, `${entry.name}/`)
        : h("a", { href: downloadUrl(box.id, path), download: entry.name, "data-file": entry.name }, entry.name);
    const remove: HTMLButtonElement = button("Delete", () => {
      if (!confirm(`Delete ${path}?`)) return;
      void busy(remove, () => files.remove(path, { recursive: entry.type === "directory" }))
        .then(() => load(dir))
        .catch((err) => failed(error, err));
    }, { class: "danger small" });
    return h(
      "tr",
      { "data-entry": entry.name },
      h("td", {}, name),
      h("td", {}, entry.type === "directory" ? "" : bytes(entry.size)),
      h("td", { class: "wide" }, when(entry.modifyTime)),
      h("td", {}, remove),
    );
  };
  upload.addEventListener("change", () => {
    const chosen = [...(upload.files ?? [])];
    upload.value = "";
    void (async () => {
      for (const file of chosen) {
        await withProgress(progress, `Uploading ${file.name} (${bytes(file.size)})…`, (report) =>
          files.upload(join(dir, file.name), file, { progress: report }),
        );
      }
      await load(dir);
    })().catch((err) => failed(error, err));
  });
  const go = h("form", { class: "row" }, where, h("button", { type: "submit" }, "Open"));
  go.addEventListener("submit", (event) => {
    event.preventDefault();
    void load(where.value.trim() || "/").catch((err) => failed(error, err));
  });
  panel.append(
    go,
    h("label", { class: "upload" }, "Upload to this directory: ", upload),
    progress,
    h("table", { class: "list", id: "files" }, h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Size"), h("th", { class: "wide" }, "Modified"), h("th", {}, ""))), list),
  );
  await load(dir);
}

// --- processes --------------------------------------------------------------------------------

async function processesTab(panel: HTMLElement, box: Instance, error: HTMLElement): Promise<void> {
  const rows = h("tbody", {});
  const load = async () => {
    const processes = await client.instances.handle(box.id).processes();
    replace(
      rows,
      ...processes.map((p) =>
        h(
          "tr",
          {},
          h("td", {}, String(p.pid)),
          h("td", {}, h("code", {}, p.argv.join(" ")), p.tag ? h("span", { class: "tag" }, p.tag) : null, p.pty ? h("span", { class: "tag" }, "pty") : null),
          h("td", { class: "wide" }, when(p.startTime)),
          h("td", {}, p.exited ? `exited ${p.exited.exitCode ?? ""}${p.exited.signal ? ` (signal ${p.exited.signal})` : ""}` : "running"),
        ),
      ),
    );
  };
  const refresh: HTMLButtonElement = button("Refresh", () => void busy(refresh, load).catch((err) => failed(error, err)), { id: "processes-refresh" });
  panel.append(
    refresh,
    h("table", { class: "list", id: "processes" }, h("thead", {}, h("tr", {}, h("th", {}, "PID"), h("th", {}, "Command"), h("th", { class: "wide" }, "Started"), h("th", {}, "State"))), rows),
  );
  await load();
}

// --- screenshots ------------------------------------------------------------------------------

async function screenshotsTab(panel: HTMLElement, box: Instance, error: HTMLElement): Promise<() => void> {
  const urls: string[] = [];
  const shots = h("div", { class: "shots", id: "screenshots" });
  const status = h("div", {});
  if (!box.data.desktop?.enabled) {
    panel.append(h("p", { class: "muted" }, "This instance has no desktop, so there is no screen to capture."));
    return () => undefined;
  }
  const take: HTMLButtonElement = button("Take a screenshot", () => {
    void busy(take, () => withProgress(status, "Capturing the screen…", () => client.instances.handle(box.id).desktop.screenshot()))
      .then((shot) => {
        const url = URL.createObjectURL(new Blob([shot.image as BlobPart], { type: `image/${shot.format}` }));
        urls.push(url);
        const name = `${box.id}-${new Date().toISOString().replace(/[:.]/g, "-")}.${shot.format}`;
        shots.prepend(
          h("figure", {}, h("img", { src: url, alt: `Screenshot of ${box.id}`, width: shot.width, height: shot.height }), h("figcaption", {}, `${shot.width}×${shot.height} · `, h("a", { href: url, download: name }, "Download"))),
        );
      })
      .catch((err) => failed(error, err));
  }, { id: "take-screenshot" });
  panel.append(take, status, shots);
  return () => {
    for (const url of urls) URL.revokeObjectURL(url);
  };
}
