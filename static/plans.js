// The plan catalog and the Subscribe dialog, which sends the customer to Stripe Checkout.

import { formatPrice, h, icon, replaceChildren } from "./render.js";

const RESOURCE_TYPES = {
  graph: {
    label: "Graph database",
    group: "Graph databases",
    icon: "graph",
    blurb: "A private PostgreSQL database with nodes and edges, yours alone.",
  },
  repository: {
    label: "Shared repository",
    group: "Shared repository",
    icon: "repo",
    blurb: "Read access to the shared repository through your own login.",
  },
};

function typeInfo(type) {
  return RESOURCE_TYPES[type] || { label: type, group: type, icon: "graph", blurb: "" };
}

export function resourceTypeLabel(type) {
  return typeInfo(type).label;
}

function priceParts(price) {
  const text = formatPrice(price);
  const [amount, interval] = text.split(" / ");
  return { amount, interval };
}

const number = (value) => Number(value).toLocaleString();

export function megabytes(mb) {
  return mb >= 1024 ? `${number(Math.round(mb / 102.4) / 10)} GB` : `${number(mb)} MB`;
}

// Optional extras of `GET /v1/plans` (not in the contract): shown when the server sends them.
// `limits` are enforced; `soft_limits` are measured and shown, never enforced, and say so.
const LIMITS = [
  ["max_connections", (n) => `${number(n)} connections at once`],
  ["max_per_user", (n) => (n === 1 ? "1 per account" : `Up to ${number(n)} per account`)],
];
const SOFT_LIMITS = [["storage_mb", (mb) => `${megabytes(mb)} storage included (measured, not capped)`]];

function limitList(limits, softLimits) {
  const pick = (table, values) =>
    values && typeof values === "object"
      ? table.filter(([key]) => typeof values[key] === "number").map(([key, text]) => text(values[key]))
      : [];
  const items = [...pick(LIMITS, limits), ...pick(SOFT_LIMITS, softLimits)].map((text) =>
    h("li", {}, icon("check"), text),
  );
  return items.length ? h("ul", { class: "plan-limits" }, items) : null;
}

export class PlanCatalog {
  constructor({ api, container, dialog, banner }) {
    this.api = api;
    this.container = container;
    this.banner = banner;
    this.dialog = new SubscribeDialog(dialog, api);
  }

  /** `callback(subscription)` runs when a saved card bought one without leaving the page. */
  set onSubscribed(callback) {
    this.dialog.onSubscribed = callback;
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
    // One group per resource type, in catalog order: a small pricing page per product.
    const groups = new Map();
    for (const plan of plans) {
      if (!groups.has(plan.resource_type)) groups.set(plan.resource_type, []);
      groups.get(plan.resource_type).push(plan);
    }
    replaceChildren(
      this.container,
      [...groups].map(([type, members]) => {
        const info = typeInfo(type);
        const id = `plan-group-${type}`;
        return h(
          "section",
          { class: "plan-group", "aria-labelledby": id },
          h("h3", { class: "plan-group-title", id }, icon(info.icon), info.group),
          h("div", { class: "plan-grid" }, members.map((plan) => this.#card(plan))),
        );
      }),
    );
  }

  #card(plan) {
    const type = typeInfo(plan.resource_type);
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
      h("h4", { class: "plan-name", id: titleId }, plan.display_name || plan.name),
      h(
        "p",
        { class: "plan-price", dataset: { testid: `price-${plan.name}` } },
        h("span", { class: "amount" }, amount),
        interval ? h("span", { class: "interval" }, ` / ${interval}`) : null,
      ),
      h("p", { class: "plan-blurb muted" }, plan.description || type.blurb || ""),
      limitList(plan.limits, plan.soft_limits),
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
    this.savedCard = dialog.querySelector("[data-testid=saved-card-submit]");
    this.onSubscribed = null;
    this.plan = null;
    this.opener = null;
    dialog.querySelector(".dialog-cancel").addEventListener("click", () => this.close());
    dialog.addEventListener("close", () => this.opener && this.opener.focus());
    this.form.addEventListener("submit", (event) => this.#submit(event));
    this.savedCard?.addEventListener("click", () => this.#subscribeWithSavedCard());
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
    if (this.savedCard) this.savedCard.disabled = busy;
  }

  #name() {
    const name = this.input.value.trim();
    if (!name) {
      this.#setError("Give your resource a name.");
      this.input.focus();
    }
    return name;
  }

  // The saved card is charged at once; the new subscription then follows on the list's stream.
  // A bank that asks the customer to confirm the payment sends them to Checkout for it.
  async #subscribeWithSavedCard() {
    const name = this.#name();
    if (!name) return;
    this.#setError("");
    this.#busy(true);
    try {
      const subscription = await this.api.subscribeWithSavedCard(this.plan.name, name);
      if (subscription.checkout_url) {
        window.location.assign(subscription.checkout_url);
        return;
      }
      this.close();
      if (this.onSubscribed) this.onSubscribed(subscription);
    } catch (error) {
      this.#busy(false);
      if (error.handled) {
        this.close();
        return;
      }
      this.#setError(
        error.code === "payment_method_required"
          ? "You have no saved card yet. Continue to checkout to pay with a card."
          : error.message,
      );
      this.input.focus();
    }
  }

  async #submit(event) {
    event.preventDefault();
    const name = this.#name();
    if (!name) return;
    this.#setError("");
    this.#busy(true);
    try {
      const session = await this.api.checkout(this.plan.name, name);
      window.location.assign(session.checkout_url);
    } catch (error) {
      this.#busy(false);
      if (error.handled) {
        this.close(); // signed out: the sign-in form says why
        return;
      }
      this.#setError(error.message);
      this.input.focus();
    }
  }
}
