// The panel of one operation: progress bar, current step, failure, and the log of steps.
// Updated in place, so that the bar animates and nothing around it loses focus.

import { isTerminal } from "./operation-state.js";
import { badge, formatTime, h, humanize, icon, replaceChildren, updateBadge } from "./render.js";

const TITLES = {
  provision: "Set-up",
  deprovision: "Removal",
  resize: "Plan change",
  suspend: "Suspension",
  resume: "Restoration",
};

function title(state) {
  return TITLES[state.kind] || "Operation";
}

function stepText(entry) {
  return entry.message || humanize(entry.step);
}

export class OperationView {
  constructor(id) {
    this.id = id;
    this.heading = h("h4", { class: "op-title", id: `op-title-${id}` });
    this.badge = badge("pending", `operation-status-${id}`);
    this.percent = h("span", { class: "op-percent", "aria-hidden": "true" }, "0%");
    this.bar = h("progress", {
      class: "op-bar",
      max: 100,
      value: 0,
      "aria-valuemin": "0",
      "aria-valuemax": "100",
      "aria-valuenow": "0",
      "aria-labelledby": `op-title-${id}`,
      dataset: { testid: `progress-${id}` },
    });
    this.current = h("p", { class: "op-step", dataset: { testid: `step-${id}` } });
    this.gap = h(
      "p",
      { class: "op-gap", hidden: true },
      icon("info"),
      "Part of this history is no longer kept; showing the current state.",
    );
    this.error = h("div", {
      class: "op-error",
      role: "alert",
      hidden: true,
      dataset: { testid: `operation-error-${id}` },
    });
    this.log = h("ol", { class: "step-log", dataset: { testid: `step-log-${id}` } });
    this.logSummary = h("summary", {}, "Steps");
    this.element = h(
      "section",
      {
        class: "operation",
        "aria-labelledby": `op-title-${id}`,
        dataset: { testid: `operation-${id}` },
      },
      h("div", { class: "op-head" }, this.heading, this.badge, this.percent),
      this.bar,
      this.current,
      this.gap,
      this.error,
      h("details", { class: "op-details", open: true }, this.logSummary, this.log),
    );
  }

  update(state) {
    const terminal = isTerminal(state);
    this.element.dataset.status = state.status;
    this.heading.textContent = title(state);
    updateBadge(this.badge, state.status);
    this.percent.textContent = `${state.progress}%`;
    this.bar.value = state.progress;
    this.bar.setAttribute("aria-valuenow", String(state.progress));
    this.bar.setAttribute("aria-valuetext", `${state.progress}%, ${this.#currentText(state)}`);
    this.current.textContent = this.#currentText(state);
    this.gap.hidden = !state.gap;
    this.error.hidden = !(state.status === "failed" || state.status === "cancelled");
    this.error.textContent = this.error.hidden ? "" : state.error || "The operation stopped.";
    this.#renderLog(state, terminal);
  }

  #currentText(state) {
    if (state.status === "completed") return state.message || "Done";
    if (state.status === "pending") return "Waiting to start…";
    if (state.status === "waiting") return state.message || "Waiting for the database server…";
    const entry = state.steps.find((item) => item.step === state.step);
    if (entry) return stepText(entry);
    return state.message || (state.step ? humanize(state.step) : "Starting…");
  }

  #renderLog(state, terminal) {
    const last = state.steps.length - 1;
    const items = state.steps.map((entry, index) => {
      let mark = "done";
      if (index === last && !(terminal && state.status === "completed")) {
        mark = state.status === "failed" || state.status === "cancelled" ? "failed" : "current";
      }
      const glyph = { done: "check", current: "spinner", failed: "cross" }[mark];
      return h(
        "li",
        { class: `step step-${mark}`, dataset: { step: entry.step } },
        icon(glyph),
        h("span", { class: "step-text" }, stepText(entry)),
        entry.at ? h("time", { class: "step-at", datetime: entry.at }, formatTime(entry.at)) : null,
      );
    });
    replaceChildren(this.log, items);
    const count = state.steps.length;
    this.logSummary.textContent = count === 1 ? "1 step" : `${count} steps`;
  }
}
