// Small DOM helpers and formatters shared by every page. Text always goes in as text nodes
// (never as HTML), so nothing the server or a user sends can become markup.

/**
 * h("button", { class: "btn", dataset: { testid: "x" }, onclick: fn }, "Label", child)
 * Attributes starting with "on" become listeners; `false`/`null` attributes are left out.
 */
export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "dataset") Object.assign(element.dataset, value);
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else if (name in element && typeof value !== "string") element[name] = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function replaceChildren(element, ...children) {
  element.replaceChildren();
  append(element, children);
}

/** An SVG icon from the sprite `icons.svg` (`<use href=".../icons.svg#icon-name">`). */
export function icon(name, label = null) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "icon");
  svg.setAttribute("width", "16");
  svg.setAttribute("height", "16");
  if (label) {
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", label);
  } else {
    svg.setAttribute("aria-hidden", "true");
  }
  const use = document.createElementNS(ns, "use");
  use.setAttribute("href", `/static/icons.svg#icon-${name}`);
  svg.append(use);
  return svg;
}

export function formatPrice(price) {
  if (!price || typeof price.amount !== "number") return "Price on request";
  const currency = String(price.currency || "usd").toUpperCase();
  let amount;
  try {
    const format = new Intl.NumberFormat(undefined, { style: "currency", currency });
    const digits = format.resolvedOptions().maximumFractionDigits;
    amount = format.format(price.amount / 10 ** digits);
  } catch {
    amount = `${(price.amount / 100).toFixed(2)} ${currency}`;
  }
  return price.interval ? `${amount} / ${price.interval}` : amount;
}

export function formatDate(iso) {
  if (!iso) return null;
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return null;
  return date.toLocaleDateString(undefined, { year: "numeric", month: "short", day: "numeric" });
}

export function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  return date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

/** "create_database" → "Create database" (for steps that come without a message). */
export function humanize(name) {
  const text = String(name || "").replace(/[_.-]+/g, " ").trim();
  return text ? text[0].toUpperCase() + text.slice(1) : "";
}

const STATUS_LABELS = {
  pending_payment: "Awaiting payment",
  provisioning: "Provisioning",
  active: "Active",
  past_due: "Past due",
  unpaid: "Unpaid",
  paused: "Paused",
  canceled: "Canceled",
  failed: "Failed",
  expired: "Expired",
  pending: "Pending",
  running: "Running",
  waiting: "Waiting",
  completed: "Completed",
  cancelled: "Cancelled",
};

const STATUS_TONES = {
  active: "good",
  completed: "good",
  provisioning: "busy",
  running: "busy",
  waiting: "warn",
  pending: "busy",
  pending_payment: "wait",
  past_due: "warn",
  unpaid: "warn",
  paused: "wait",
  failed: "bad",
  canceled: "muted",
  cancelled: "muted",
  expired: "muted",
};

export function statusLabel(status) {
  return STATUS_LABELS[status] || humanize(status);
}

/** A status badge; its `data-status` holds the raw status for tests and styles. */
export function badge(status, testid) {
  return h(
    "span",
    { class: `badge tone-${STATUS_TONES[status] || "muted"}`, dataset: { testid, status } },
    statusLabel(status),
  );
}

export function updateBadge(element, status) {
  element.className = `badge tone-${STATUS_TONES[status] || "muted"}`;
  element.dataset.status = status;
  element.textContent = statusLabel(status);
}

const CONNECTION_TEXT = {
  connecting: "connecting",
  live: "live",
  reconnecting: "reconnecting",
  offline: "offline",
};

export function renderConnection(element, state) {
  element.dataset.state = state;
  const text = element.querySelector(".connection-text") || element;
  text.textContent = CONNECTION_TEXT[state] || state;
  element.title = {
    live: "Receiving updates as they happen",
    connecting: "Connecting to live updates",
    reconnecting: "Connection lost; resuming where it left off",
    offline: "No connection; retrying",
  }[state];
}

/** The page's error banner: shows one error at a time, keeps focus where it was. */
export class ErrorBanner {
  constructor(element) {
    this.element = element;
    this.text = element.querySelector(".error-text");
    this.code = element.querySelector(".error-code");
    element.querySelector(".error-close").addEventListener("click", () => this.clear());
  }

  show(error, context = null) {
    if (error && error.handled) return;
    const message = error && error.message ? error.message : String(error);
    this.text.textContent = context ? `${context}: ${message}` : message;
    this.code.textContent = error && error.code ? error.code : "";
    this.element.hidden = false;
  }

  clear() {
    this.element.hidden = true;
    this.text.textContent = "";
    this.code.textContent = "";
  }
}

/** Says status changes to screen readers (a polite live region). */
export class Announcer {
  constructor(element) {
    this.element = element;
  }

  say(text) {
    // A fresh text node makes screen readers speak the same sentence twice in a row too.
    this.element.textContent = "";
    window.setTimeout(() => {
      this.element.textContent = text;
    }, 50);
  }
}

/** Copy text, with a fallback for pages not served over HTTPS or localhost. */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = h("textarea", { class: "visually-hidden", readonly: true });
  area.value = text;
  document.body.append(area);
  area.select();
  const ok = document.execCommand("copy");
  area.remove();
  if (!ok) throw new Error("copy failed");
}
