// "Change plan": a dialog offering the other plans of the subscription's resource type; the
// server changes the plan in Stripe (prorated) and answers the subscription, whose
// `operation_id` is the `resize` that follows, shown on the card like any operation.

import { formatPrice, h } from "./render.js";

export class ChangePlanDialog {
  constructor(api) {
    this.api = api;
    this.plans = null;
    this.sub = null;
    this.opener = null;
    this.onChanged = null;
    this.select = h("select", { id: "change-plan-select", dataset: { testid: "change-plan-select" } });
    this.error = h("p", { class: "field-error", role: "alert", dataset: { testid: "change-plan-error" } });
    this.summary = h("p", { class: "dialog-summary muted" });
    this.submit = h(
      "button",
      { type: "submit", class: "btn primary", dataset: { testid: "change-plan-submit" } },
      "Change plan",
    );
    const cancel = h("button", { type: "button", class: "btn ghost dialog-cancel" }, "Cancel");
    cancel.addEventListener("click", () => this.dialog.close());
    this.form = h(
      "form",
      { method: "dialog", novalidate: "" },
      h("h2", { class: "dialog-title", id: "change-plan-title" }, "Change plan"),
      this.summary,
      h("label", { for: "change-plan-select" }, "New plan"),
      this.select,
      h(
        "p",
        { class: "hint" },
        "An upgrade is charged now for the rest of the period; a downgrade is credited to your next invoice.",
      ),
      this.error,
      h("div", { class: "dialog-actions" }, cancel, this.submit),
    );
    this.form.addEventListener("submit", (event) => this.#submit(event));
    this.dialog = h(
      "dialog",
      { class: "dialog", "aria-labelledby": "change-plan-title", dataset: { testid: "change-plan-dialog" } },
      this.form,
    );
    this.dialog.addEventListener("close", () => this.opener && this.opener.focus());
    document.body.append(this.dialog);
  }

  /** Opens for `sub`; `onChanged(sub)` receives the answer of a change that went through. */
  async open(sub, opener, onChanged) {
    this.sub = sub;
    this.opener = opener;
    this.onChanged = onChanged;
    this.error.textContent = "";
    this.#busy(false);
    if (!this.plans) this.plans = await this.api.plans();
    const others = this.plans.filter((p) => p.resource_type === sub.resource_type && p.name !== sub.plan);
    this.select.replaceChildren(
      ...others.map((p) =>
        h("option", { value: p.name }, `${p.display_name || p.name} · ${formatPrice(p.price)}`),
      ),
    );
    this.summary.textContent = `Now on ${sub.plan_display_name || sub.plan}.`;
    this.submit.disabled = others.length === 0;
    this.dialog.showModal();
    this.select.focus();
  }

  #busy(busy) {
    this.submit.disabled = busy;
    this.submit.textContent = busy ? "Changing…" : "Change plan";
  }

  async #submit(event) {
    event.preventDefault();
    this.error.textContent = "";
    this.#busy(true);
    try {
      const sub = await this.api.changePlan(this.sub.id, this.select.value);
      this.dialog.close();
      if (this.onChanged) this.onChanged(sub);
    } catch (error) {
      this.#busy(false);
      if (error.handled) {
        this.dialog.close();
        return;
      }
      // A downgrade that does not fit says why (409), in the customer's words.
      this.error.textContent = error.message;
      this.select.focus();
    }
  }
}
