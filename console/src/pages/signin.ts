/** Sign-in: an API key, exchanged for the session cookie (the key is not kept anywhere). */

import { go } from "../main.js";
import { signIn } from "../session.js";
import { errorLine, field, h, showError } from "../ui.js";

export function signInPage(main: HTMLElement, message: string): void {
  const key = h("input", {
    type: "password",
    name: "api-key",
    id: "api-key",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "cd_…",
    required: true,
  });
  const error = errorLine();
  if (message) error.textContent = message;
  const submit = h("button", { type: "submit", id: "sign-in" }, "Sign in");
  const form = h(
    "form",
    { class: "card", id: "sign-in-form" },
    h("h1", {}, "Sign in to Cyberdesk"),
    field("API key", key, "`cyberdesk config get api_key` prints the development key of `make run`."),
    submit,
    error,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit.disabled = true;
    showError(error);
    const secret = key.value;
    key.value = ""; // the key leaves the page now: only the gateway keeps it
    signIn(secret)
      .then(() => go("/instances"))
      .catch((err) => showError(error, err))
      .finally(() => {
        submit.disabled = false;
      });
  });
  main.append(form);
  key.focus();
}
