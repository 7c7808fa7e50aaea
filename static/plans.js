// The plan catalog and the Subscribe dialog, which sends the customer to Stripe Checkout.

import { formatPrice, h, icon, replaceChildren } from "./render.js";

const RESOURCE_TYPES = {
  graph: { label: "Graph database", icon: "graph", blurb: "A private PostgreSQL database with nodes and edges, yours alone." },
  repository: { label: "Shared repository", icon: "repo", blurb: "Read access to the shared repository through your own login." },
};

export function resourceTypeLabel(type) {
  return (RESOURCE_TYPES[type] || { label: type }).label;
}

function priceParts(price) {
  const text = formatPrice(price);
  const [amount, interval] = text.split(" / ");
  return { amount, interval };
}

export class PlanCatalog {
  constructor({ api, container, dialog, banner }) {
    this.api = api;
    this.container = container;
    this.banner = banner;
    this.dialog = new SubscribeDialog(dialog, api);
  }

  async load() {
    this.container.setAttribute("aria-busy", "true");
    try {
      const plans = await this.api.plans();
      this.render(plans);
    } catch (error) {
      this.banner.show(error, "Could not load the plans");
      replaceChildren(this.container, h("p", { class: "empty" }, "The plans could not be loaded."));
    } finally {
      this.container.removeAttribute("aria-busy");
    }
  }

  render(plans) {
    if (!plans.length) {
      replaceChildren(this.container, h("p", { class: "empty" }, "No plans are on sale right now."));
      return;
    }
    replaceChildren(this.container, plans.map((plan) => this.#card(plan)));
  }

  #card(plan) {
    const type = RESOURCE_TYPES[plan.resource_type] || { label: plan.resource_type, icon: "graph" };
    const { amount, interval } = priceParts(plan.price);
    const titleId = `plan-title-${plan.name}`;
    const button = h(
      "button",
      {
        type: "button",
        class: "btn primary",
        "aria-describedby": titleId,
        dataset: { testid: `subscribe-${plan.name}` },
      },
      "Subscribe",
    );
    button.addEventListener("click", () => this.dialog.open(plan, button));
    return h(
      "article",
      { class: "card plan", "aria-labelledby": titleId, dataset: { testid: `plan-${plan.name}` } },
      h("div", { class: "plan-type" }, icon(type.icon), type.label),
      h("h3", { id: titleId }, plan.display_name || plan.name),
      h(
        "p",
        { class: "plan-price", dataset: { testid: `price-${plan.name}` } },
        h("span", { class: "amount" }, amount),
        interval ? h("span", { class: "interval" }, ` / ${interval}`) : null,
      ),
      h("p", { class: "plan-blurb muted" }, type.blurb || ""),
      button,
    );
  }
}

/** A modal form asking for the resource name, then off to Checkout. */
class SubscribeDialog {
  constructor(dialog, api) {
    this.dialog = dialog;
    this.api = api;
    this.form = dialog.querySelector("form");
    this.title = dialog.querySelector(".dialog-title");
    this.summary = dialog.querySelector(".dialog-summary");
    this.input = dialog.querySelector("[data-testid=resource-name-input]");
    this.error = dialog.querySelector(".field-error");
    this.submit = dialog.querySelector("[type=submit]");
    this.plan = null;
    this.opener = null;
    dialog.querySelector(".dialog-cancel").addEventListener("click", () => this.close());
    dialog.addEventListener("close", () => this.opener && this.opener.focus());
    this.form.addEventListener("submit", (event) => this.#submit(event));
  }

  open(plan, opener) {
    this.plan = plan;
    this.opener = opener;
    this.title.textContent = `Subscribe to ${plan.display_name || plan.name}`;
    this.summary.textContent = `${formatPrice(plan.price)} · ${resourceTypeLabel(plan.resource_type)}`;
    this.input.value = "";
    this.#setError("");
    this.#busy(false);
    this.dialog.showModal();
    this.input.focus();
  }

  close() {
    this.dialog.close();
  }

  #setError(message) {
    this.error.textContent = message;
    if (message) this.input.setAttribute("aria-invalid", "true");
    else this.input.removeAttribute("aria-invalid");
  }

  #busy(busy) {
    this.submit.disabled = busy;
    this.submit.textContent = busy ? "Opening checkout…" : "Continue to checkout";
  }

  async #submit(event) {
    event.preventDefault();
    const name = this.input.value.trim();
    if (!name) {
      this.#setError("Give your resource a name.");
      this.input.focus();
      return;
    }
    this.#setError("");
    this.#busy(true);
    try {
      const session = await this.api.checkout(this.plan.name, name);
      window.location.assign(session.checkout_url);
    } catch (error) {
      this.#setError(error.message);
      this.#busy(false);
      this.input.focus();
    }
  }
}
