// The user's subscriptions: cards with live status, period end, actions, the running
// operation of each, and graph credentials.

import { ChangePlanDialog } from "./change-plan.js";
import { credentialsPanel } from "./credentials.js";
import { isTerminal } from "./operation-state.js";
import { OperationTracker } from "./operations.js";
import { megabytes, resourceTypeLabel } from "./plans.js";
import {
  badge,
  formatDate,
  formatPrice,
  h,
  icon,
  replaceChildren,
  statusLabel,
  updateBadge,
} from "./render.js";

// Statuses in which a subscription is still billed, so it can be cancelled at period end.
const BILLED = new Set(["active", "past_due", "unpaid", "paused"]);
const ENDED = new Set(["canceled", "expired", "failed"]);
// Statuses whose resource is suspended (access follows payment).
const SUSPENDED = new Set(["unpaid", "paused"]);
// The server measures sizes at most once a minute: asking more often shows nothing new.
const USAGE_REFRESH_MS = 60_000;

function formatBytes(bytes) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value >= 10 || unit === 0 ? Math.round(value) : value.toFixed(1)} ${units[unit]}`;
}

function subscriptionName(sub) {
  return sub.plan_display_name || sub.plan || "Subscription";
}

// What a failed provisioning gave back (`sub.refund`), in the customer's words.
function refundNotice(sub) {
  const refund = sub.refund;
  if (!refund || typeof refund.amount !== "number") return null;
  const amount = formatPrice({ amount: refund.amount, currency: refund.currency });
  const text =
    {
      succeeded: `Refunded ${amount}`,
      failed: `The refund of ${amount} failed; please contact us.`,
      canceled: `The refund of ${amount} was cancelled; please contact us.`,
    }[refund.status] || `Refund of ${amount} under way`;
  return h("p", { class: "notice", dataset: { testid: `refund-${sub.id}` } }, icon("info"), text);
}

class SubscriptionCard {
  constructor(list, sub) {
    this.list = list;
    this.sub = sub;
    this.tracker = null;
    this.showOperation = false;
    this.revealing = false;
    this.credentialsShown = false;
    this.usage = null; // GET /v1/graphs/{id}/usage, for an active graph
    this.usageAskedAt = 0;
    const id = sub.id;
    this.title = h("h3", { id: `sub-title-${id}` });
    this.meta = h("p", { class: "sub-meta muted" });
    this.badge = badge(sub.status, `status-${id}`);
    this.facts = h("dl", { class: "facts" });
    this.notice = h("div", { class: "notice-slot" });
    this.opSlot = h("div", { class: "op-slot" });
    this.credSlot = h("div", { class: "cred-slot" });
    this.actions = h("div", { class: "actions" });
    this.element = h(
      "article",
      { class: "card sub", "aria-labelledby": `sub-title-${id}`, dataset: { testid: `subscription-${id}` } },
      h("header", { class: "sub-head" }, h("div", {}, this.title, this.meta), this.badge),
      this.notice,
      h("div", { class: "sub-body" }, this.facts, this.actions),
      this.opSlot,
      this.credSlot,
    );
    this.update(sub);
  }

  update(sub) {
    const previous = this.sub;
    this.sub = sub;
    this.element.dataset.status = sub.status;
    this.element.classList.toggle("ended", ENDED.has(sub.status));
    this.title.textContent = subscriptionName(sub);
    replaceChildren(
      this.meta,
      icon(sub.resource_type === "repository" ? "repo" : "graph"),
      resourceTypeLabel(sub.resource_type),
      sub.resource_name ? ` · ${sub.resource_name}` : null,
    );
    updateBadge(this.badge, sub.status);
    // A new plan has new limits: the usage answer carries them, so ask again now.
    if (previous !== sub && previous.plan !== sub.plan) this.usageAskedAt = 0;
    this.#renderFacts();
    this.#renderActions();
    this.#loadUsage();
    if (sub.operation_id && sub.operation_id !== this.tracker?.id) this.#track(sub.operation_id);
    if (previous !== sub && previous.status !== sub.status) {
      this.list.announcer.say(`${subscriptionName(sub)}: ${statusLabel(sub.status)}`);
    }
  }

  #renderFacts() {
    const sub = this.sub;
    const rows = [];
    // A scheduled cancellation ends it on Stripe's cancel_at (the period's end, or the date
    // chosen in the Customer Portal).
    const end = formatDate((sub.cancel_at_period_end && sub.cancel_at) || sub.current_period_end);
    if (end && !ENDED.has(sub.status)) {
      const label = sub.cancel_at_period_end ? "Ends on" : "Renews on";
      rows.push([label, end, `period-end-${sub.id}`]);
    }
    if (sub.resource_id) rows.push(["Resource", h("code", {}, sub.resource_id), null]);
    const usage = sub.status === "active" && sub.resource_type === "graph" ? this.usage : null;
    if (usage && typeof usage.database_bytes === "number") {
      const included = usage.soft_limits?.storage_mb;
      rows.push([
        "Storage",
        h(
          "span",
          { title: "Measured about once a minute; not capped." },
          formatBytes(usage.database_bytes),
          typeof included === "number" ? ` of ${megabytes(included)} included` : null,
          h("span", { class: "muted" }, " (measured)"),
        ),
        `storage-${sub.id}`,
      ]);
    }
    if (usage && typeof usage.limits?.max_connections === "number") {
      rows.push(["Connections", `Up to ${usage.limits.max_connections} at once`, `connections-${sub.id}`]);
    }
    if (!rows.length) rows.push(["Subscription", h("code", {}, sub.id), null]);
    replaceChildren(
      this.facts,
      rows.map(([term, value, testid]) =>
        h("div", {}, h("dt", {}, term), h("dd", { dataset: testid ? { testid } : {} }, value)),
      ),
    );
    replaceChildren(
      this.notice,
      sub.cancel_at_period_end && !ENDED.has(sub.status)
        ? h(
            "p",
            { class: "notice", dataset: { testid: `cancel-at-period-end-${sub.id}` } },
            icon("info"),
            end ? `Cancels on ${end}.` : "Cancels at the end of the period.",
          )
        : null,
      refundNotice(sub),
      this.#paymentNotice(),
    );
  }

  /** Access follows payment: a past-due subscription keeps it for a grace period, an unpaid
   * or paused one is suspended until it is paid or resumed. */
  #paymentNotice() {
    const sub = this.sub;
    if (sub.status === "past_due") {
      return h(
        "p",
        { class: "notice payment", role: "status", dataset: { testid: `past-due-banner-${sub.id}` } },
        icon("alert"),
        "Your last payment failed. Your resource stays available for a grace period; pay the open invoice to keep it.",
      );
    }
    if (SUSPENDED.has(sub.status)) {
      return h(
        "p",
        { class: "notice payment", role: "status", dataset: { testid: `suspended-banner-${sub.id}` } },
        icon("alert"),
        sub.status === "paused"
          ? "This subscription is paused, so its resource is suspended until it resumes."
          : "This subscription is unpaid, so its resource is suspended until the invoice is paid.",
      );
    }
    return null;
  }

  /** The graph's measured size, for an active graph; kept as it was when the server fails. */
  async #loadUsage() {
    const sub = this.sub;
    if (sub.status !== "active" || sub.resource_type !== "graph" || !sub.resource_id) return;
    if (Date.now() - this.usageAskedAt < USAGE_REFRESH_MS) return;
    this.usageAskedAt = Date.now();
    try {
      this.usage = await this.list.api.graphUsage(sub.resource_id);
    } catch {
      return;
    }
    this.#renderFacts();
  }

  /** `focus`: the test id of the button to focus afterwards (a keyboard user pressed one). */
  #renderActions({ focus = null } = {}) {
    const sub = this.sub;
    const active = this.actions.contains(document.activeElement)
      ? document.activeElement.dataset.testid
      : null;
    const buttons = [];
    if (sub.status === "active" && sub.resource_id && !this.credentialsShown) {
      buttons.push(
        this.#button("reveal-credentials", "Reveal credentials", "secondary", () => this.#reveal(), "key"),
      );
    }
    if (sub.status === "active" && !sub.cancel_at_period_end) {
      const change = this.#button("change-plan", "Change plan", "secondary", () =>
        this.list.changePlan.open(this.sub, change, (changed) => this.update(changed)).catch((error) =>
          this.list.banner.show(error, "Could not load the plans"),
        ),
      );
      buttons.push(change);
    }
    if (BILLED.has(sub.status) && !sub.cancel_at_period_end) {
      buttons.push(this.#button("cancel", "Cancel subscription", "danger", () => this.#act("cancel")));
    }
    if (BILLED.has(sub.status) && sub.cancel_at_period_end) {
      buttons.push(this.#button("reactivate", "Reactivate", "primary", () => this.#act("reactivate")));
    }
    replaceChildren(this.actions, buttons);
    this.actions.hidden = buttons.length === 0;
    // Keep keyboard users where they were, or on the button that took the pressed one's
    // place (Cancel → Reactivate); never on a button they did not mean (Reveal rotates).
    const wanted = focus || active;
    if (wanted) {
      const target = buttons.find((button) => button.dataset.testid === wanted);
      (target || buttons[buttons.length - 1])?.focus();
    }
  }

  #button(action, label, tone, handler, glyph = null) {
    const button = h(
      "button",
      {
        type: "button",
        class: `btn ${tone}`,
        "aria-describedby": `sub-title-${this.sub.id}`,
        dataset: { testid: `${action}-${this.sub.id}` },
      },
      glyph ? icon(glyph) : null,
      label,
    );
    button.addEventListener("click", handler);
    return button;
  }

  async #act(action) {
    // Disabling the pressed button takes its focus away: give it to the one that replaces it.
    const other = action === "cancel" ? "reactivate" : "cancel";
    const refocus = this.actions.contains(document.activeElement) ? `${other}-${this.sub.id}` : null;
    const buttons = this.actions.querySelectorAll("button");
    buttons.forEach((button) => {
      button.disabled = true;
    });
    this.actions.setAttribute("aria-busy", "true");
    try {
      const sub = await this.list.api[action](this.sub.id);
      if (sub && sub.id === this.sub.id) this.update(sub);
      this.list.announcer.say(
        action === "cancel"
          ? `${subscriptionName(this.sub)} will be cancelled at the end of the period`
          : `${subscriptionName(this.sub)} was reactivated`,
      );
    } catch (error) {
      this.list.banner.show(error, action === "cancel" ? "Could not cancel" : "Could not reactivate");
    } finally {
      this.actions.removeAttribute("aria-busy");
      this.#renderActions({ focus: refocus });
    }
  }

  async #reveal() {
    if (this.revealing) return;
    this.revealing = true;
    const button = this.actions.querySelector(`[data-testid="reveal-credentials-${this.sub.id}"]`);
    if (button) button.disabled = true;
    try {
      const creds = await this.list.api.subscriptionCredentials(this.sub.id);
      this.credentialsShown = true;
      const panel = credentialsPanel(this.sub.id, creds, () => {
        this.credentialsShown = false;
        this.credSlot.replaceChildren();
        this.#renderActions();
        this.actions.querySelector("button")?.focus();
      });
      this.credSlot.replaceChildren(panel);
      this.#renderActions();
      panel.querySelector("h4").focus();
    } catch (error) {
      this.list.banner.show(error, "Could not reveal the credentials");
      if (button) button.disabled = false;
    } finally {
      this.revealing = false;
    }
  }

  #track(operationId) {
    if (this.tracker) this.tracker.stop();
    this.showOperation = false;
    this.opSlot.replaceChildren();
    const tracker = new OperationTracker({
      api: this.list.api,
      hub: this.list.hub,
      id: operationId,
      onChange: (state, previous) => this.#operationChanged(state, previous),
      onError: (error) => this.list.banner.show(error, "Could not follow the operation"),
    });
    this.tracker = tracker;
    tracker.start();
  }

  #operationChanged(state, previous) {
    // A finished operation seen only as a snapshot is old news unless it went wrong.
    const show = !isTerminal(state) || this.showOperation || state.status !== "completed";
    if (show && !this.showOperation) {
      this.showOperation = true;
      this.opSlot.replaceChildren(this.tracker.element);
    }
    if (isTerminal(state) && !isTerminal(previous) && previous.status !== "pending") {
      const done = state.status === "completed";
      this.list.announcer.say(
        `${subscriptionName(this.sub)}: ${done ? "ready" : state.error || statusLabel(state.status)}`,
      );
    }
  }

  owns(operationId) {
    return this.tracker?.id === operationId;
  }

  dispose() {
    if (this.tracker) this.tracker.stop();
  }
}

export class SubscriptionList {
  constructor({ api, hub, container, banner, announcer }) {
    this.api = api;
    this.hub = hub;
    this.container = container;
    this.banner = banner;
    this.announcer = announcer;
    this.cards = new Map();
    this.changePlan = new ChangePlanDialog(api);
    this.loading = null;
    this.queued = [];
    this.reloadTimer = null;
  }

  /** (Re)load the list; events that arrive meanwhile are applied on top afterwards. */
  load() {
    if (this.loading) return this.loading;
    this.container.setAttribute("aria-busy", "true");
    this.loading = this.api
      .subscriptions()
      .then((subs) => {
        this.#render(subs);
        const queued = this.queued.splice(0);
        for (const sub of queued) this.upsert(sub);
      })
      .catch((error) => this.banner.show(error, "Could not load your subscriptions"))
      .finally(() => {
        this.loading = null;
        this.container.removeAttribute("aria-busy");
      });
    return this.loading;
  }

  #render(subs) {
    const seen = new Set();
    const elements = subs.map((sub) => {
      seen.add(sub.id);
      const card = this.cards.get(sub.id);
      if (card) {
        card.update(sub);
        return card.element;
      }
      const created = new SubscriptionCard(this, sub);
      this.cards.set(sub.id, created);
      return created.element;
    });
    for (const [id, card] of this.cards) {
      if (!seen.has(id)) {
        card.dispose();
        this.cards.delete(id);
      }
    }
    replaceChildren(this.container, elements.length ? elements : this.#empty());
  }

  #empty() {
    return h(
      "div",
      { class: "empty", dataset: { testid: "no-subscriptions" } },
      h("p", { class: "empty-title" }, "No subscriptions yet"),
      h("p", { class: "muted" }, "Pick a plan below; you will watch it being set up, live."),
    );
  }

  upsert(sub) {
    if (this.loading) {
      this.queued.push(sub);
      return;
    }
    const card = this.cards.get(sub.id);
    if (card) {
      // Updates of one subscription can be published out of order (its events are handled
      // side by side); `updated_at` orders its versions, so an older one is dropped.
      if (sub.updated_at && card.sub.updated_at && sub.updated_at < card.sub.updated_at) return;
      card.update(sub);
      return;
    }
    const created = new SubscriptionCard(this, sub);
    this.cards.set(sub.id, created);
    if (this.cards.size === 1) this.container.replaceChildren();
    this.container.prepend(created.element);
  }

  /** What the user calls the subscription `id` (its resource's name), if it is listed. */
  displayName(id) {
    const sub = this.cards.get(id)?.sub;
    return sub ? sub.resource_name || subscriptionName(sub) : null;
  }

  /** An event of the user's stream (`/v1/events`). */
  handleEvent(type, data) {
    if (type === "subscription.updated" && data.subscription) {
      this.upsert(data.subscription);
    } else if (type === "stream.reset") {
      // History was lost: the snapshot is the whole list (else ask for it).
      const subs = data.snapshot && data.snapshot.subscriptions;
      if (Array.isArray(subs) && !this.loading) this.#render(subs);
      else this.load();
    } else if (type.startsWith("operation.") && data.operation_id) {
      // Each operation's own stream feeds its card; an operation no card knows yet means a
      // subscription changed in a way not seen here.
      const known = [...this.cards.values()].some((card) => card.owns(data.operation_id));
      if (!known) this.#reloadSoon();
    }
  }

  #reloadSoon() {
    clearTimeout(this.reloadTimer);
    this.reloadTimer = setTimeout(() => this.load(), 500);
  }

  dispose() {
    clearTimeout(this.reloadTimer);
    for (const card of this.cards.values()) card.dispose();
    this.cards.clear();
  }
}
