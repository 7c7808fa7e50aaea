// Checkout return page (/checkout/return?session_id=…): after Stripe Checkout, confirm the
// payment, then follow the provisioning operation live from its first step.
//
// Test ids, besides those of app.js's "Both pages" list:
//   checkout-return     the card (data-phase: confirming | waiting | provisioning |
//                       completed | failed | cancelled | error)
//   return-title, return-lede, check-again, back-to-dashboard
//   status-<subscription id>   the subscription's badge (data-status = raw status)

import { Api, ApiError, credentials } from "./api.js";
import { OperationTracker } from "./operations.js";
import { resourceTypeLabel } from "./plans.js";
import {
  Announcer,
  ErrorBanner,
  badge,
  h,
  icon,
  renderConnection,
  statusLabel,
  updateBadge,
} from "./render.js";
import { renderSignIn } from "./signin.js";
import { StreamHub } from "./streams.js";

// Polling `GET /v1/checkout/{id}` (which asks Stripe itself when the webhook is late).
const POLL_DELAYS_MS = [400, 600, 800, 1000, 1500, 2000, 2000, 3000];
const POLL_FOR_MS = 60_000;
const ENDED = new Set(["failed", "canceled", "expired"]);

const NOUNS = { graph: "graph database", repository: "repository access" };

/** [title, lede, icon] of each phase; `noun` names what is being set up. */
function phaseText(phase, noun) {
  return {
    confirming: [
      "Confirming your payment…",
      "This takes a moment; the page follows along by itself.",
      "spinner",
    ],
    waiting: [
      "Waiting for payment confirmation",
      "Stripe has not confirmed the payment yet. Check again in a moment.",
      "info",
    ],
    provisioning: [
      `Setting up your ${noun}…`,
      "Payment confirmed. Every step shows here as it happens.",
      "spinner",
    ],
    completed: [`Your ${noun} is ready`, "Reveal its credentials from the dashboard.", "check"],
    failed: [
      "Set-up failed",
      "Your subscription has been cancelled and your payment is refunded; the reason is below.",
      "cross",
    ],
    cancelled: [
      "Set-up cancelled",
      "Your subscription has been cancelled and your payment is refunded.",
      "cross",
    ],
    error: [
      "This checkout cannot be followed",
      "See the message above, or go back to the dashboard.",
      "alert",
    ],
  }[phase];
}

const $ = (id) => document.getElementById(id);

class CheckoutReturn {
  constructor(sessionId) {
    this.sessionId = sessionId;
    this.banner = new ErrorBanner(document.querySelector('[data-testid="error-banner"]'));
    this.announcer = new Announcer($("announcer"));
    this.card = $("return");
    this.subscriptionBox = $("return-subscription");
    this.connection = $("connection");
    this.api = new Api({
      onUnauthorized: () => {
        if (this.hub) this.signIn("Your API key is no longer accepted. Sign in again.");
      },
    });
    this.hub = null;
    this.subscription = null;
    this.subscriptionBadge = null;
    this.tracker = null;
    this.pollTimer = null;
    $("check-again").addEventListener("click", () => this.poll(Date.now()));
  }

  start() {
    if (!this.sessionId) {
      this.card.hidden = false;
      this.#phase("error");
      this.banner.show({ message: "This page needs a checkout session id (?session_id=…).", code: "bad_request" });
      return;
    }
    if (credentials.get()) this.follow();
    else this.signIn();
  }

  signIn(message = null) {
    this.#stop();
    credentials.clear();
    this.card.hidden = true;
    this.connection.hidden = true;
    renderConnection(this.connection, "offline");
    renderSignIn($("signin-slot"), {
      lede: "Sign in with the API key you subscribed with to follow the set-up.",
      onSignedIn: () => this.follow(),
    });
    if (message) this.banner.show({ message, code: "unauthorized" });
  }

  follow() {
    this.banner.clear();
    this.card.hidden = false;
    this.connection.hidden = false;
    this.#phase("confirming");
    this.hub = new StreamHub(this.api, (state) => renderConnection(this.connection, state));
    renderConnection(this.connection, this.hub.state);
    // The user's stream shows the subscription turn active; it may also bring the
    // operation before the next poll does.
    this.hub.open("/v1/events", {
      onEvent: (type, data) => {
        const sub = data.subscription;
        if (type === "subscription.updated" && sub && sub.id === this.subscription?.id) {
          this.#showSubscription(sub);
          if (sub.operation_id) this.#follow(sub.operation_id);
        }
      },
    });
    this.poll(Date.now());
  }

  async poll(startedAt, attempt = 0) {
    clearTimeout(this.pollTimer);
    $("check-again").hidden = true;
    if (this.tracker) return;
    if (attempt === 0) this.#phase("confirming");
    let answer;
    try {
      answer = await this.api.checkoutSession(this.sessionId);
    } catch (error) {
      if (error instanceof ApiError && error.status !== 0 && error.status !== 429 && error.status < 500) {
        if (error.status !== 401) {
          // Our own words, never the server's: whatever was put in ?session_id= stays out of
          // the page (a crafted link could otherwise make the site say anything).
          this.banner.show(
            error.status === 404 || error.status === 400
              ? { message: "There is no such checkout. Open the link from your payment again, or go back to the dashboard.", code: error.code }
              : error,
          );
          this.#phase("error");
          this.#stop(); // nothing to follow: free the stream
          this.connection.hidden = true;
        }
        return;
      }
      answer = null; // a network failure or a server hiccup: keep trying
    }
    if (answer) {
      await this.#learnSubscription(answer);
      if (answer.operation_id) {
        this.#follow(answer.operation_id);
        return;
      }
      if (ENDED.has(answer.status)) {
        this.#phase("failed");
        return;
      }
    }
    if (Date.now() - startedAt >= POLL_FOR_MS) {
      this.#phase("waiting");
      $("check-again").hidden = false;
      return;
    }
    const delay = POLL_DELAYS_MS[Math.min(attempt, POLL_DELAYS_MS.length - 1)];
    this.pollTimer = setTimeout(() => this.poll(startedAt, attempt + 1), delay);
  }

  async #learnSubscription(answer) {
    if (this.subscription || !answer.subscription_id) {
      if (this.subscriptionBadge && answer.status) updateBadge(this.subscriptionBadge, answer.status);
      return;
    }
    let sub = { id: answer.subscription_id, status: answer.status };
    try {
      sub = await this.api.subscription(answer.subscription_id);
    } catch {
      /* the name can wait; the status is known */
    }
    this.#showSubscription(sub);
  }

  #showSubscription(sub) {
    if (this.subscription && this.subscription.id === sub.id && this.subscriptionBadge) {
      if (this.subscription.status !== sub.status) {
        this.announcer.say(`Subscription: ${statusLabel(sub.status)}`);
      }
      this.subscription = { ...this.subscription, ...sub };
      updateBadge(this.subscriptionBadge, sub.status);
      return;
    }
    this.subscription = sub;
    this.subscriptionBadge = badge(sub.status, `status-${sub.id}`);
    const kind = sub.resource_type ? resourceTypeLabel(sub.resource_type) : "Subscription";
    this.subscriptionBox.replaceChildren(
      h(
        "div",
        { class: "sub-head" },
        h(
          "div",
          {},
          h("h2", { class: "h3" }, sub.plan_display_name || sub.plan || "Your subscription"),
          h("p", { class: "sub-meta muted" }, icon(sub.resource_type === "repository" ? "repo" : "graph"), kind),
        ),
        this.subscriptionBadge,
      ),
    );
    this.subscriptionBox.hidden = false;
    this.#phase(this.card.dataset.phase, { announce: false, force: true }); // names the resource now
  }

  #follow(operationId) {
    if (this.tracker) return;
    clearTimeout(this.pollTimer);
    this.#phase("provisioning");
    this.tracker = new OperationTracker({
      api: this.api,
      hub: this.hub,
      id: operationId,
      onChange: (state) => {
        if (["completed", "failed", "cancelled"].includes(state.status)) this.#phase(state.status);
      },
      onError: (error) => this.banner.show(error, "Could not follow the set-up"),
    });
    $("return-operation").replaceChildren(this.tracker.element);
    this.tracker.openStream();
  }

  #phase(phase, { announce = true, force = false } = {}) {
    if (this.card.dataset.phase === phase && !force) return;
    const noun = NOUNS[this.subscription?.resource_type] || "resource";
    const [title, lede, glyph] = phaseText(phase, noun);
    this.card.dataset.phase = phase;
    $("return-title").textContent = title;
    $("return-lede").textContent = lede;
    this.card.querySelector(".return-icon").replaceChildren(icon(glyph));
    if (announce && phase !== "confirming") this.announcer.say(title);
  }

  #stop() {
    clearTimeout(this.pollTimer);
    if (this.tracker) this.tracker.stop();
    this.tracker = null;
    if (this.hub) this.hub.closeAll();
    this.hub = null;
  }
}

new CheckoutReturn(new URLSearchParams(window.location.search).get("session_id")).start();
