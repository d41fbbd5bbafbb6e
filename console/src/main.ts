/**
 * The console's entry: the layout, the hash router (`#/instances`, `#/instances/<id>`, `#/keys`,
 * `#/usage`, `#/api`, `#/signin`) and the one place where an ended session sends the page back
 * to sign-in. Each page is a function that fills the main element and returns a cleanup (close
 * its streams and sockets) run when the page is left.
 */

import "@xterm/xterm/css/xterm.css";
import "./style.css";

import { apiPage } from "./pages/api.js";
import { instancePage } from "./pages/instance.js";
import { instancesPage } from "./pages/instances.js";
import { keysPage } from "./pages/keys.js";
import { signInPage } from "./pages/signin.js";
import { usagePage } from "./pages/usage.js";
import { forget, isAdmin, resume, session, signOut } from "./session.js";
import { button, errorLine, h, replace, sentence } from "./ui.js";

export type Cleanup = () => void;
export type Page = (main: HTMLElement) => Cleanup | void | Promise<Cleanup | void>;

const app = document.getElementById("app")!;
let cleanup: Cleanup | undefined;
let endedMessage = "";
let generation = 0; // which render is current: a page that finishes loading after it was left is closed at once

/** Go to a route (hash). */
export function go(route: string): void {
  if (location.hash === `#${route}`) void render();
  else location.hash = route;
}

/**
 * The session is over (the gateway answered UNAUTHENTICATED: signed out elsewhere, expired, or
 * its key revoked): back to sign-in, saying why in one sentence.
 */
export function sessionEnded(err: unknown): void {
  forget();
  const text = sentence(err);
  endedMessage = /^The console session/.test(text) ? text : `The console session has ended: ${text[0]!.toLowerCase()}${text.slice(1)}`;
  go("/signin");
}

/** Whether `err` means the session is over (and the page went to sign-in). */
export function handleEnded(err: unknown): boolean {
  if ((err as { code?: string }).code === "UNAUTHENTICATED") {
    sessionEnded(err);
    return true;
  }
  return false;
}

function nav(active: string): HTMLElement {
  const link = (route: string, text: string) =>
    h("a", { href: `#${route}`, class: active === route ? "active" : null, "aria-current": active === route ? "page" : null }, text);
  const who = session();
  const out = button("Sign out", () => {
    void signOut().finally(() => {
      endedMessage = "";
      go("/signin");
    });
  }, { class: "secondary", id: "sign-out" });
  return h(
    "header",
    { class: "top" },
    h("a", { href: "#/instances", class: "brand" }, "Cyberdesk"),
    h("nav", {}, link("/instances", "Instances"), isAdmin() ? link("/keys", "Keys") : null, link("/usage", "Usage"), link("/api", "API")),
    h("div", { class: "who" }, who ? h("span", { title: `key ${who.keyId}` }, who.tenantId) : null, out),
  );
}

async function render(): Promise<void> {
  cleanup?.();
  cleanup = undefined;
  const mine = ++generation;
  const route = location.hash.replace(/^#/, "") || "/instances";
  if (!session() && route !== "/signin") {
    try {
      await resume();
    } catch (err) {
      replace(app, errorLine(err));
      return;
    }
    if (!session()) {
      go("/signin");
      return;
    }
  }
  if (route === "/signin") {
    const main = h("main", { class: "signin" });
    replace(app, main);
    const message = endedMessage;
    endedMessage = "";
    signInPage(main, message);
    return;
  }
  const [, first, second] = route.split("/");
  let page: Page;
  let active = `/${first}`;
  if (first === "instances" && second) {
    page = (main) => instancePage(main, decodeURIComponent(second));
    active = "/instances";
  } else if (first === "keys") page = keysPage;
  else if (first === "usage") page = usagePage;
  else if (first === "api") page = apiPage;
  else {
    page = instancesPage;
    active = "/instances";
  }
  const main = h("main", {});
  replace(app, nav(active), main);
  try {
    const done = await page(main);
    if (done && mine === generation) cleanup = done;
    else done?.(); // left while it loaded: its streams close now
  } catch (err) {
    if (mine === generation && !handleEnded(err)) main.append(errorLine(err));
  }
}

window.addEventListener("hashchange", () => void render());
void render();
