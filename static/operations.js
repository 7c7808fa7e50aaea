// Following one operation: its snapshot, then its own stream (which replays every event from
// the start and closes after the terminal one), into an OperationView.

import { ApiError } from "./api.js";
import {
  applyEvent,
  emptyState,
  fromSnapshot,
  isTerminal,
  resetSnapshot,
} from "./operation-state.js";
import { OperationView } from "./operation-view.js";
import { TERMINAL_EVENTS } from "./streams.js";

export class OperationTracker {
  /**
   * `onChange(state, previous)` after every change; `onError(error)` when the operation
   * cannot be followed (e.g. it is not found).
   */
  constructor({ api, hub, id, onChange = () => {}, onError = () => {} }) {
    this.api = api;
    this.hub = hub;
    this.id = id;
    this.onChange = onChange;
    this.onError = onError;
    this.state = emptyState(id);
    this.view = new OperationView(id);
    this.view.update(this.state);
    this.stream = null;
    this.stopped = false;
  }

  get element() {
    return this.view.element;
  }

  /** The snapshot first; then the stream, unless the operation is over (with `history`,
   * the stream is opened anyway, to list the steps of a finished operation). */
  async start({ history = false } = {}) {
    try {
      this.#set(fromSnapshot(await this.api.operation(this.id), this.state));
    } catch (error) {
      this.onError(error);
      if (error instanceof ApiError && error.status === 404) return;
    }
    if (!isTerminal(this.state) || history) this.openStream();
  }

  /** Straight to the stream, which replays every event from the operation's first. */
  openStream() {
    if (this.stopped || this.stream) return;
    this.stream = this.hub.open(`/v1/operations/${encodeURIComponent(this.id)}/events`, {
      onEvent: (type, data) => this.#set(applyEvent(this.state, type, data)),
      isFinal: (type, data) =>
        TERMINAL_EVENTS.has(type) ||
        (type === "stream.reset" && isTerminal(fromSnapshot(resetSnapshot(data) || {}))),
      onClosed: (stream) => this.#closed(stream),
    });
  }

  /** The browser gave up on the stream (an HTTP error, or 204 after the end). */
  async #closed(stream) {
    let snapshot;
    try {
      snapshot = await this.api.operation(this.id);
    } catch (error) {
      if (error instanceof ApiError && [401, 403, 404].includes(error.status)) {
        this.onError(error);
        return "stop";
      }
      return "retry";
    }
    const finished = isTerminal(fromSnapshot(snapshot));
    // A finished operation answers 204 once its terminal event was seen; if that answer
    // comes again, the snapshot is all there is left to show.
    if (finished && stream.failures >= 2) {
      this.#set(applyEvent(this.state, `operation.${snapshot.status}`, snapshot));
      return "stop";
    }
    return "retry";
  }

  #set(next) {
    if (next === this.state) return;
    const previous = this.state;
    this.state = next;
    this.view.update(next);
    this.onChange(next, previous);
  }

  stop() {
    this.stopped = true;
    if (this.stream) this.stream.stop();
  }
}
