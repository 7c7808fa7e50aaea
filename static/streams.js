// Server-Sent Events with EventSource: stream tokens, renewal, resuming without gaps or
// doubles, and one connection state for the page (see docs/API.md, Server-Sent Events).

import { ApiError } from "./api.js";

export const EVENT_TYPES = [
  "operation.started",
  "operation.progress",
  "operation.waiting",
  "operation.completed",
  "operation.failed",
  "operation.cancelled",
  "subscription.updated",
  "invoice.updated",
  "stream.reset",
];
export const TERMINAL_EVENTS = new Set([
  "operation.completed",
  "operation.failed",
  "operation.cancelled",
]);

const MAX_BACKOFF_MS = 10_000;
const OFFLINE_AFTER_FAILURES = 3;
const SEEN_IDS_KEPT = 2000;

/** How long to wait before the n-th consecutive attempt (n >= 1), with jitter. */
export function backoffDelay(failures) {
  const base = Math.min(MAX_BACKOFF_MS, 1000 * 1.6 ** Math.max(0, failures - 1));
  return Math.round(base * (0.8 + Math.random() * 0.4));
}

/** When to fetch the next token: ahead of expiry by a fifth of its life (5 s to 60 s). */
export function renewDelay(expiresAt, now = Date.now(), issuedAt = now) {
  const life = Math.max(0, expiresAt - issuedAt);
  const margin = Math.min(Math.max(life * 0.2, 5000), 60_000, life / 2);
  return Math.max(1000, expiresAt - margin - now);
}

/** One short-lived token shared by every stream of the page, renewed before it expires. */
export class TokenSource {
  constructor(api, onRenewed) {
    this.api = api;
    this.onRenewed = onRenewed;
    this.current = null;
    this.pending = null;
    this.timer = null;
    this.renewAt = 0;
    this.stopped = false;
  }

  /** A token that is good for a while yet (fetched when needed; concurrent callers share). */
  async get() {
    if (this.current && Date.now() < this.renewAt) return this.current.token;
    if (!this.pending) {
      this.pending = this.api.streamToken().finally(() => {
        this.pending = null;
      });
    }
    const fresh = await this.pending;
    this.#accept(fresh);
    return fresh.token;
  }

  #accept(fresh) {
    if (this.current === fresh || this.stopped) return;
    this.current = fresh;
    const delay = renewDelay(fresh.expiresAt);
    this.renewAt = Date.now() + delay;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.renew(), delay);
  }

  /** Fetch a new token now and hand it to the streams (they reconnect with it). */
  async renew() {
    if (this.stopped) return;
    try {
      this.current = null;
      const token = await this.get();
      this.onRenewed(token);
    } catch (error) {
      // Streams retry on their own when their connection fails; try again soon.
      if (!(error instanceof ApiError && error.status === 401)) {
        this.timer = setTimeout(() => this.renew(), backoffDelay(2));
      }
    }
  }

  /** Forget the current token: the server may have refused it (expired, or signed with a
   * key it no longer has). The next `get()` fetches a new one. */
  invalidate() {
    this.current = null;
  }

  /** Tabs in the background get their timers slowed down: check again on return. */
  checkOnWake() {
    if (this.current && Date.now() >= this.renewAt) this.renew();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.current = null;
  }
}

/**
 * One EventSource and what it takes to keep it going.
 *
 * The browser reconnects by itself (sending Last-Event-ID) after a dropped connection; it
 * gives up for good on an HTTP error (401 when a token ran out, 429, 404) or on 204, and
 * then this class decides: `onClosed` may say "stop", otherwise it makes a new EventSource
 * with a fresh token and `&last_event_id=`. Ids already seen are dropped either way.
 */
export class EventStream {
  constructor(hub, path, { onEvent, onStatus, onClosed, onGap, isFinal }) {
    this.hub = hub;
    this.path = path;
    this.onEvent = onEvent;
    this.onStatus = onStatus || (() => {});
    this.onClosed = onClosed || (async () => "retry");
    this.onGap = onGap || (() => {});
    this.isFinal = isFinal || (() => false);
    this.source = null;
    this.lastEventId = null;
    this.seen = new Set();
    this.failures = 0;
    this.opened = false;
    this.status = "connecting";
    this.done = false;
    this.retryTimer = null;
  }

  async start() {
    await this.#connect();
  }

  stop() {
    this.done = true;
    clearTimeout(this.retryTimer);
    if (this.source) this.source.close();
    this.source = null;
    this.#setStatus("done");
  }

  /** A planned switch to a new token: no status flicker, resumes after the last event. */
  renew(token) {
    if (this.done || !this.source || this.source.readyState === EventSource.CLOSED) return;
    this.source.close();
    this.#open(token);
  }

  /** Skip the wait of a scheduled retry (the browser says it is back online). */
  retryNow() {
    if (this.done || !this.retryTimer) return;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.#connect();
  }

  url(token) {
    const params = new URLSearchParams({ token });
    if (this.lastEventId) params.set("last_event_id", this.lastEventId);
    return `${this.path}?${params}`;
  }

  async #connect() {
    if (this.done) return;
    let token;
    try {
      token = await this.hub.tokens.get();
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        this.stop();
        return;
      }
      this.#failed();
      return;
    }
    if (!this.done) this.#open(token);
  }

  #open(token) {
    const source = new EventSource(this.url(token));
    this.source = source;
    const listener = (event) => {
      if (this.source === source) this.#receive(event);
    };
    for (const type of EVENT_TYPES) source.addEventListener(type, listener);
    source.addEventListener("message", listener);
    source.onopen = () => {
      if (this.source !== source) return;
      if (this.opened && !this.lastEventId) this.onGap();
      this.opened = true;
      this.failures = 0;
      this.#setStatus("live");
    };
    source.onerror = () => {
      if (this.source !== source || this.done) return;
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        this.source = null;
        this.#closed();
      } else {
        // The browser is retrying by itself, with Last-Event-ID.
        this.failures += 1;
        this.#setStatus(this.#troubled());
      }
    };
  }

  #receive(event) {
    if (this.done) return;
    const id = event.lastEventId || null;
    // A stream.reset may come without an id (then lastEventId repeats the previous one).
    if (event.type !== "stream.reset" && id && this.seen.has(id)) return;
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      console.warn("lookout: ignoring an event whose data is not JSON", event.type);
      return;
    }
    if (id) this.#remember(id);
    this.onEvent(event.type, data, id);
    if (this.isFinal(event.type, data)) this.stop();
  }

  #remember(id) {
    this.lastEventId = id;
    this.seen.add(id);
    if (this.seen.size > SEEN_IDS_KEPT) this.seen.delete(this.seen.values().next().value);
  }

  async #closed() {
    this.failures += 1;
    this.hub.tokens.invalidate();
    this.#setStatus(this.#troubled());
    let verdict = "retry";
    try {
      verdict = await this.onClosed(this);
    } catch {
      verdict = "retry";
    }
    if (verdict === "stop") this.stop();
    else this.#failed();
  }

  #failed() {
    if (this.done) return;
    this.#setStatus(this.#troubled());
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.#connect();
    }, backoffDelay(this.failures));
  }

  #troubled() {
    const offline = navigator.onLine === false || this.failures >= OFFLINE_AFTER_FAILURES;
    return offline ? "offline" : "reconnecting";
  }

  #setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    this.onStatus(status);
    this.hub.refresh();
  }
}

const SEVERITY = ["live", "connecting", "reconnecting", "offline"];

/** The streams of one page: one token source, one connection indicator. */
export class StreamHub {
  constructor(api, onConnection) {
    this.onConnection = onConnection;
    this.streams = new Set();
    this.state = "connecting";
    this.tokens = new TokenSource(api, (token) => {
      for (const stream of this.streams) stream.renew(token);
    });
    this.onOnline = () => {
      for (const stream of this.streams) stream.retryNow();
      this.refresh();
    };
    this.onWake = () => {
      if (document.visibilityState === "visible") this.tokens.checkOnWake();
    };
    window.addEventListener("online", this.onOnline);
    window.addEventListener("offline", this.onOnline);
    document.addEventListener("visibilitychange", this.onWake);
  }

  open(path, handlers) {
    const stream = new EventStream(this, path, handlers);
    this.streams.add(stream);
    stream.start();
    this.refresh();
    return stream;
  }

  refresh() {
    for (const stream of this.streams) if (stream.done) this.streams.delete(stream);
    let worst = -1;
    for (const stream of this.streams) worst = Math.max(worst, SEVERITY.indexOf(stream.status));
    let state = worst < 0 ? this.state : SEVERITY[worst];
    if (navigator.onLine === false) state = "offline";
    if (state !== this.state) {
      this.state = state;
      this.onConnection(state);
    }
  }

  closeAll() {
    for (const stream of [...this.streams]) stream.stop();
    this.tokens.stop();
    window.removeEventListener("online", this.onOnline);
    window.removeEventListener("offline", this.onOnline);
    document.removeEventListener("visibilitychange", this.onWake);
  }
}
