// The HTTP API of Lookout (see docs/API.md), and where the browser keeps the API key.

const KEY_STORAGE = "lookout.apiKey";

/** The API key lives in sessionStorage: it survives the trip to Stripe Checkout and back
 * in the same tab, and is gone when the tab closes. */
export const credentials = {
  get() {
    try {
      return sessionStorage.getItem(KEY_STORAGE);
    } catch {
      return null; // storage disabled: behave as signed out
    }
  },
  set(key) {
    sessionStorage.setItem(KEY_STORAGE, key);
  },
  clear() {
    try {
      sessionStorage.removeItem(KEY_STORAGE);
    } catch {
      /* nothing to clear */
    }
  },
};

const FALLBACK_MESSAGES = {
  0: "Lookout cannot be reached. Check your connection and try again.",
  401: "Your API key was not accepted. Sign in again.",
  403: "This API key may not do that.",
  404: "That was not found. It may have been removed.",
  409: "That conflicts with the current state. Reload and try again.",
  413: "That request is too large.",
  422: "Some of what you entered is not valid.",
  429: "Too many requests right now. Wait a moment and try again.",
};

/** An error answer `{"error": {"code", "message"}}`, or a network failure (status 0). */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

function fallbackMessage(status) {
  if (FALLBACK_MESSAGES[status]) return FALLBACK_MESSAGES[status];
  if (status >= 500) return "Lookout had a problem answering. Try again in a moment.";
  return `The request failed (HTTP ${status}).`;
}

async function errorFrom(response) {
  let code = `http_${response.status}`;
  let message = fallbackMessage(response.status);
  try {
    const body = await response.json();
    if (body && typeof body.error === "object" && body.error !== null) {
      if (typeof body.error.code === "string") code = body.error.code;
      if (typeof body.error.message === "string" && body.error.message) {
        message = body.error.message;
      }
    }
  } catch {
    /* not JSON: keep the fallback sentence */
  }
  return new ApiError(response.status, code, message);
}

const enc = encodeURIComponent;

export class Api {
  /** `onUnauthorized(error)` runs on every 401, so that a page can sign the user out. */
  constructor({ getKey = () => credentials.get(), onUnauthorized = null } = {}) {
    this.getKey = getKey;
    this.onUnauthorized = onUnauthorized;
  }

  async request(method, path, body) {
    const headers = { Accept: "application/json" };
    const key = this.getKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch {
      throw new ApiError(0, "network_error", fallbackMessage(0));
    }
    if (!response.ok) {
      const error = await errorFrom(response);
      if (response.status === 401 && this.onUnauthorized) {
        error.handled = true; // the page signs out and says so; no second message
        this.onUnauthorized(error);
      }
      throw error;
    }
    if (response.status === 204) return { data: null, response };
    try {
      return { data: await response.json(), response };
    } catch {
      throw new ApiError(response.status, "bad_response", "Lookout sent an answer that is not JSON.");
    }
  }

  async json(method, path, body) {
    return (await this.request(method, path, body)).data;
  }

  plans() {
    return this.json("GET", "/v1/plans").then((body) => body.data);
  }
  subscriptions() {
    return this.json("GET", "/v1/subscriptions").then((body) => body.data);
  }
  subscription(id) {
    return this.json("GET", `/v1/subscriptions/${enc(id)}`);
  }
  checkout(plan, resourceName) {
    return this.json("POST", "/v1/checkout", { plan, resource_name: resourceName });
  }
  /** Subscribe with the saved card (no Checkout); 402 payment_method_required without one. */
  subscribeWithSavedCard(plan, resourceName) {
    return this.json("POST", "/v1/subscriptions", { plan, resource_name: resourceName });
  }
  checkoutSession(sessionId) {
    return this.json("GET", `/v1/checkout/${enc(sessionId)}`);
  }
  cancel(subscriptionId) {
    return this.json("POST", `/v1/subscriptions/${enc(subscriptionId)}/cancel`);
  }
  reactivate(subscriptionId) {
    return this.json("POST", `/v1/subscriptions/${enc(subscriptionId)}/reactivate`);
  }
  billingPortal() {
    return this.json("POST", "/v1/billing/portal");
  }
  invoices() {
    return this.json("GET", "/v1/invoices").then((body) => body.data);
  }
  graphCredentials(graphId) {
    return this.json("POST", `/v1/graphs/${enc(graphId)}/credentials`);
  }
  /** A graph's or a repository subscription's login, with a new password (shown once). */
  subscriptionCredentials(subscriptionId) {
    return this.json("POST", `/v1/subscriptions/${enc(subscriptionId)}/credentials`);
  }
  changePlan(subscriptionId, plan) {
    return this.json("PATCH", `/v1/subscriptions/${enc(subscriptionId)}`, { plan });
  }
  graphUsage(graphId) {
    return this.json("GET", `/v1/graphs/${enc(graphId)}/usage`);
  }
  operation(id) {
    return this.json("GET", `/v1/operations/${enc(id)}`);
  }

  /** A stream token, with `expiresAt` moved onto this browser's clock (the server's `Date`
   * header tells how far the two clocks are apart). */
  async streamToken() {
    const { data, response } = await this.request("POST", "/v1/stream-tokens");
    const serverNow = Date.parse(response.headers.get("Date") || "");
    const skew = Number.isNaN(serverNow) ? 0 : serverNow - Date.now();
    const expires = Date.parse(data.expires_at);
    return {
      token: data.token,
      expiresAt: Number.isNaN(expires) ? Date.now() + 60_000 : expires - skew,
    };
  }
}
