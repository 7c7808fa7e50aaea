// Lookout dashboard (served at `/`): sign in, plans, subscriptions, live operations.
//
// Test ids (`data-testid`), stable for browser tests. <id> is the API's id, <name> a plan name.
//   Both pages
//     connection-status            text: connecting | live | reconnecting | offline
//     error-banner                 last error answer (`.error-text` message, `.error-code`)
//     signin-form, api-key-input, signin-submit
//     signout                      sign-out button
//     operation-<op id>            an operation's panel (data-status = operation status)
//     operation-status-<op id>     its status badge (data-status = raw status)
//     progress-<op id>             <progress max=100> with value and aria-valuenow
//     step-<op id>                 the current step's sentence
//     step-log-<op id>             <ol>, one <li data-step="<step>"> per distinct step, in order
//     operation-error-<op id>      the failure's message (role=alert; hidden unless failed/cancelled)
//   Dashboard
//     plans                        the catalog; plan-<name>, price-<name>, subscribe-<name>
//     subscribe-dialog             the dialog asking for the resource name:
//       resource-name-input, checkout-submit, checkout-error
//     subscriptions                the list; no-subscriptions when empty
//     subscription-<id>            a card (data-status = subscription status)
//     status-<id>                  its badge (data-status = raw status, text = label)
//     period-end-<id>              the period end date
//     cancel-at-period-end-<id>    the notice shown while a cancellation is scheduled:
//                                  "Cancels on <date>." (Stripe's cancel_at)
//     cancel-<id>, reactivate-<id>, reveal-credentials-<id>
//     credentials-<id>             the revealed credentials (shown once)
//     manage-billing               opens Stripe's Customer Portal
//     invoices                     the invoice list; no-invoices when empty
//     invoice-<invoice id>         a row; invoice-status-<invoice id> (data-status = Stripe's),
//                                  invoice-amount-<invoice id>
//     change-plan-<id>             opens change-plan-dialog: change-plan-select,
//                                  change-plan-submit, change-plan-error (a refusal's reason)
//     past-due-banner-<id>         shown while past due (access kept for a grace period)
//     suspended-banner-<id>        shown while unpaid or paused (access suspended)
//   Checkout return page (/checkout/return?session_id=…): see checkout-return.js.

import { Api, credentials } from "./api.js";
import { InvoiceList, wireManageBilling } from "./invoices.js";
import { PlanCatalog } from "./plans.js";
import { Announcer, ErrorBanner, renderConnection } from "./render.js";
import { renderSignIn } from "./signin.js";
import { StreamHub } from "./streams.js";
import { SubscriptionList } from "./subscriptions.js";

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

class Dashboard {
  constructor() {
    this.banner = new ErrorBanner($("error-banner"));
    this.announcer = new Announcer(document.getElementById("announcer"));
    this.connection = document.getElementById("connection");
    this.signinSlot = document.getElementById("signin-slot");
    this.view = document.getElementById("dashboard");
    this.signoutButton = $("signout");
    this.signoutButton.addEventListener("click", () => this.signOut());
    this.api = new Api({
      onUnauthorized: () => {
        if (this.session) this.signOut("Your API key is no longer accepted. Sign in again.");
      },
    });
    this.catalog = new PlanCatalog({
      api: this.api,
      container: $("plans"),
      dialog: $("subscribe-dialog"),
      banner: this.banner,
    });
    wireManageBilling($("manage-billing"), { api: this.api, banner: this.banner });
    this.session = null;
  }

  start() {
    if (credentials.get()) this.open();
    else this.showSignIn();
  }

  showSignIn(message = null) {
    this.view.hidden = true;
    this.signoutButton.hidden = true;
    this.connection.hidden = true;
    renderConnection(this.connection, "offline"); // signed out: no live updates
    renderSignIn(this.signinSlot, {
      onSignedIn: () => {
        this.open();
        document.getElementById("main").focus(); // the form is gone: start from the top
      },
    });
    if (message) this.banner.show({ message, code: "unauthorized" });
  }

  open() {
    this.banner.clear();
    this.signinSlot.replaceChildren();
    this.view.hidden = false;
    this.signoutButton.hidden = false;
    this.connection.hidden = false;
    const hub = new StreamHub(this.api, (state) => renderConnection(this.connection, state));
    renderConnection(this.connection, hub.state);
    const list = new SubscriptionList({
      api: this.api,
      hub,
      container: $("subscriptions"),
      banner: this.banner,
      announcer: this.announcer,
    });
    const invoices = new InvoiceList({
      api: this.api,
      container: $("invoices"),
      banner: this.banner,
      subscriptionName: (id) => list.displayName(id),
    });
    this.session = { hub, list, invoices };
    this.catalog.onSubscribed = (subscription) => list.upsert(subscription);
    // The user stream first, so that no change falls between the list and the stream; a
    // stream that had to start over without a position reloads the list (onGap).
    hub.open("/v1/events", {
      onEvent: (type, data) => {
        list.handleEvent(type, data);
        invoices.handleEvent(type, data);
      },
      onGap: () => {
        list.load();
        invoices.load();
      },
    });
    list.load().then(() => invoices.refreshNames());
    invoices.load();
    this.catalog.load();
  }

  signOut(message = null) {
    if (this.session) {
      this.session.hub.closeAll();
      this.session.list.dispose();
      this.session = null;
    }
    credentials.clear();
    this.showSignIn(message);
  }
}

new Dashboard().start();
