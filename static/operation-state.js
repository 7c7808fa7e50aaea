// What is known about one operation, built from its snapshot and its events. Pure functions:
// applying the same event twice changes nothing, so a doubled delivery cannot show twice.

export const TERMINAL_STATUSES = new Set(["completed", "failed", "cancelled"]);

const STATUS_OF_EVENT = {
  "operation.started": "running",
  "operation.progress": "running",
  // The provisioning server does not answer; the message says when the next try is.
  "operation.waiting": "waiting",
  "operation.completed": "completed",
  "operation.failed": "failed",
  "operation.cancelled": "cancelled",
};

export function isTerminal(state) {
  return TERMINAL_STATUSES.has(state.status);
}

/** State from `GET /v1/operations/{id}` (also the snapshot of a `stream.reset`). */
export function fromSnapshot(snapshot, previous = null) {
  const state = {
    id: snapshot.id ?? previous?.id ?? null,
    kind: snapshot.kind ?? previous?.kind ?? "provision",
    status: snapshot.status ?? "pending",
    progress: clampProgress(snapshot.progress),
    step: snapshot.step ?? null,
    message: previous?.message ?? null,
    error: snapshot.error ?? null,
    result: snapshot.result ?? null,
    steps: previous ? previous.steps : [],
    gap: previous ? previous.gap : false,
  };
  // The step log is built from events only, in their order (a stream replays them all).
  return state;
}

export function emptyState(id) {
  return fromSnapshot({ id, status: "pending", progress: 0 });
}

/** After a `stream.reset`: the snapshot replaces what was known; the log keeps the steps
 * that were seen, and says that some may be missing. */
export function applyReset(state, snapshot) {
  const next = { ...fromSnapshot(snapshot, state), gap: true };
  return next.step ? withStep(next, next.step, null, null) : next;
}

/** The operation in a `stream.reset`'s data: `snapshot.operation` (null when it is gone). */
export function resetSnapshot(data) {
  const snapshot = data.snapshot || {};
  return "operation" in snapshot ? snapshot.operation : snapshot;
}

export function applyEvent(state, type, data) {
  if (type === "stream.reset") {
    const snapshot = resetSnapshot(data);
    return snapshot ? applyReset(state, snapshot) : { ...state, gap: true };
  }
  const status = STATUS_OF_EVENT[type];
  if (!status) return state;
  // Nothing moves a finished operation back; its history still fills in the log (a stream
  // opened after the snapshot said "completed" replays every step).
  if (isTerminal(state) && !TERMINAL_STATUSES.has(status)) {
    return data.step ? withStep(state, data.step, data.message ?? null, data.ts ?? null) : state;
  }
  let next = {
    ...state,
    status,
    kind: data.kind ?? state.kind,
    progress: Math.max(state.progress, clampProgress(data.progress)),
    message: data.message ?? state.message,
  };
  if (data.step) {
    next.step = data.step;
    next = withStep(next, data.step, data.message ?? null, data.ts ?? null);
  }
  if (status === "completed") {
    next.progress = 100;
    next.result = data.result ?? state.result;
  }
  if (status === "failed") next.error = data.error ?? data.message ?? state.error;
  if (status === "cancelled") next.error = data.message ?? state.error;
  return next;
}

/** The log of distinct steps, in the order first seen; `at` is the event's time. */
function withStep(state, step, message, at) {
  if (state.steps.some((entry) => entry.step === step)) {
    if (!message) return state;
    const steps = state.steps.map((entry) =>
      entry.step === step && !entry.message ? { ...entry, message } : entry,
    );
    return { ...state, steps };
  }
  return { ...state, steps: [...state.steps, { step, message, at }] };
}

function clampProgress(value) {
  const number = Number(value);
  if (!Number.isFinite(number)) return 0;
  return Math.min(100, Math.max(0, Math.round(number)));
}
