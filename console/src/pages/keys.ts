/** Keys (admin keys only): a tenant's API keys; create one (its secret shown once), revoke one. */

import type { ApiKey } from "@cyberdesk/sdk";
import { handleEnded } from "../main.js";
import { client, isAdmin, session } from "../session.js";
import { busy, button, errorLine, field, h, replace, showError, when } from "../ui.js";

export async function keysPage(main: HTMLElement): Promise<void> {
  main.append(h("h1", {}, "API keys"));
  if (!isAdmin()) {
    main.append(h("p", { class: "muted" }, "Managing keys needs a key with the admin scope; this session's key has none."));
    return;
  }
  const error = errorLine();
  const tenant = h("input", { id: "keys-tenant", value: session()?.tenantId ?? "", "aria-label": "Tenant" });
  const rows = h("tbody", {});
  const secretBox = h("div", { id: "new-secret" });
  const load = async () => {
    showError(error);
    const keys = await client.keys.list(tenant.value.trim());
    replace(rows, ...keys.map((k) => row(k)));
  };
  const failed = (err: unknown) => {
    if (!handleEnded(err)) showError(error, err);
  };
  const row = (key: ApiKey): HTMLElement => {
    const revoke: HTMLButtonElement = button("Revoke", () => {
      const own = key.keyId === session()?.keyId;
      if (!confirm(own ? `Revoke ${key.keyId}? It is the key of this session: you will be signed out.` : `Revoke ${key.keyId}?`)) return;
      void busy(revoke, () => client.keys.revoke(key.keyId)).then(load).catch(failed);
    }, { class: "danger small", "data-revoke": key.keyId });
    return h(
      "tr",
      { "data-key": key.keyId },
      h("td", {}, h("code", {}, key.keyId), key.keyId === session()?.keyId ? h("span", { class: "tag" }, "this session") : null),
      h("td", {}, key.name),
      h("td", { class: "wide" }, h("code", {}, `${key.prefix}…`)),
      h("td", {}, key.scopes.join(", ")),
      h("td", { class: "wide" }, when(key.createTime)),
      h("td", {}, key.revokeTime ? `revoked ${when(key.revokeTime)}` : revoke),
    );
  };
  const name = h("input", { id: "key-name", placeholder: "ci-runner", required: true });
  const admin = h("input", { type: "checkbox", id: "key-admin" });
  const create = h("button", { type: "submit", id: "create-key" }, "Create key");
  const form = h("form", { class: "card grid" }, field("Name", name), h("label", { class: "check" }, admin, "Admin (may manage keys)"), h("div", { class: "submit" }, create));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    showError(error);
    void busy(create, () => client.keys.create(tenant.value.trim(), name.value.trim(), { admin: admin.checked }))
      .then(({ key, secret }) => {
        name.value = "";
        replace(
          secretBox,
          h("div", { class: "card secret" }, h("p", {}, `The secret of ${key.keyId}, shown this once (only its hash is kept):`), h("code", { id: "secret-value" }, secret)),
        );
        return load();
      })
      .catch(failed);
  });
  const reload = h("form", { class: "row" }, field("Tenant", tenant), h("button", { type: "submit" }, "Show"));
  reload.addEventListener("submit", (event) => {
    event.preventDefault();
    void load().catch(failed);
  });
  main.append(
    reload,
    form,
    secretBox,
    error,
    h("table", { class: "list", id: "keys" }, h("thead", {}, h("tr", {}, h("th", {}, "Key"), h("th", {}, "Name"), h("th", { class: "wide" }, "Prefix"), h("th", {}, "Scopes"), h("th", { class: "wide" }, "Created"), h("th", {}, ""))), rows),
  );
  await load();
}
