// The user's invoices (GET /v1/invoices), kept live by `invoice.updated` events, and the
// "Manage billing" button that opens Stripe's Customer Portal.

import { formatDate, formatPrice, h, replaceChildren } from "./render.js";

const INVOICE_STATUS = {
  paid: ["Paid", "good"],
  open: ["Due", "wait"],
  uncollectible: ["Unpaid", "bad"],
  void: ["Void", "muted"],
};

function invoiceBadge(invoice) {
  const [label, tone] = INVOICE_STATUS[invoice.status] || [invoice.status || "Unknown", "muted"];
  return h(
    "span",
    { class: `badge tone-${tone}`, dataset: { testid: `invoice-status-${invoice.id}`, status: invoice.status } },
    label,
  );
}

function newestFirst(a, b) {
  return String(b.period_start || "").localeCompare(String(a.period_start || "")) ||
    String(b.number || "").localeCompare(String(a.number || ""));
}

export class InvoiceList {
  constructor({ api, container, banner, subscriptionName = () => null }) {
    this.api = api;
    this.container = container;
    this.banner = banner;
    this.subscriptionName = subscriptionName;
    this.invoices = new Map();
    this.loading = null;
    this.queued = [];
  }

  /** (Re)load the list; events that arrive meanwhile are applied on top afterwards. */
  load() {
    if (this.loading) return this.loading;
    this.container.setAttribute("aria-busy", "true");
    this.loading = this.api
      .invoices()
      .then((invoices) => {
        this.invoices = new Map(invoices.map((invoice) => [invoice.id, invoice]));
        for (const invoice of this.queued.splice(0)) this.invoices.set(invoice.id, invoice);
        this.#render();
      })
      .catch((error) => this.banner.show(error, "Could not load your invoices"))
      .finally(() => {
        this.loading = null;
        this.container.removeAttribute("aria-busy");
      });
    return this.loading;
  }

  /** An event of the user's stream (`/v1/events`). */
  handleEvent(type, data) {
    if (type === "stream.reset") {
      this.load(); // history was lost, and its snapshot holds no invoices
      return;
    }
    if (type !== "invoice.updated" || !data.invoice || !data.invoice.id) return;
    if (this.loading) {
      this.queued.push(data.invoice);
      return;
    }
    this.invoices.set(data.invoice.id, data.invoice);
    this.#render();
  }

  /** Names of subscriptions changed (a card loaded): the rows say which one they bill. */
  refreshNames() {
    if (!this.loading) this.#render();
  }

  #render() {
    const invoices = [...this.invoices.values()].sort(newestFirst);
    if (!invoices.length) {
      replaceChildren(
        this.container,
        h(
          "div",
          { class: "empty", dataset: { testid: "no-invoices" } },
          h("p", { class: "empty-title" }, "No invoices yet"),
          h("p", { class: "muted" }, "Stripe's invoices for your subscriptions show up here."),
        ),
      );
      return;
    }
    replaceChildren(
      this.container,
      h(
        "ul",
        { class: "card invoice-list" },
        invoices.map((invoice) => this.#row(invoice)),
      ),
    );
  }

  #row(invoice) {
    const amount = invoice.status === "paid" ? invoice.amount_paid : invoice.amount_due;
    const start = formatDate(invoice.period_start);
    const end = formatDate(invoice.period_end);
    const period = start && end && start !== end ? `${start} to ${end}` : start || end || "";
    const what = this.subscriptionName(invoice.subscription_id);
    return h(
      "li",
      { class: "invoice", dataset: { testid: `invoice-${invoice.id}` } },
      h(
        "div",
        { class: "invoice-main" },
        h("span", { class: "invoice-number" }, invoice.number || invoice.id),
        h("span", { class: "muted invoice-period" }, what ? `${what} · ${period}` : period),
      ),
      h(
        "span",
        { class: "invoice-amount", dataset: { testid: `invoice-amount-${invoice.id}` } },
        formatPrice({ amount, currency: invoice.currency }),
      ),
      invoiceBadge(invoice),
      invoice.hosted_invoice_url
        ? h(
            "a",
            {
              class: "btn ghost small",
              href: invoice.hosted_invoice_url,
              target: "_blank",
              rel: "noopener noreferrer",
              "aria-label": `View invoice ${invoice.number || invoice.id}`,
            },
            "View",
          )
        : null,
    );
  }
}

/** The "Manage billing" button: a fresh portal session each time (they are short-lived). */
export function wireManageBilling(button, { api, banner }) {
  button.addEventListener("click", async () => {
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    try {
      const { url } = await api.billingPortal();
      window.location.assign(url);
    } catch (error) {
      banner.show(error, "Could not open billing");
      button.disabled = false;
    } finally {
      button.removeAttribute("aria-busy");
    }
  });
}
