/** Usage and plan: not served yet (billing_svc reports no usage over the REST face on this branch). */

import { h } from "../ui.js";

export function usagePage(main: HTMLElement): void {
  main.append(
    h("h1", {}, "Usage and plan"),
    h("p", { class: "muted", id: "usage-missing" }, "Usage and plan are not available yet: the billing service does not report them through the gateway on this version."),
  );
}
