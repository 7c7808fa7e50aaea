// The sign-in form: an API key, checked against the API before it is kept.

import { Api, ApiError, credentials } from "./api.js";
import { h, icon } from "./render.js";

/** Render the form into `container`; `onSignedIn()` runs once a key was accepted. */
export function renderSignIn(container, { onSignedIn, lede }) {
  const input = h("input", {
    id: "api-key",
    name: "api_key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    "aria-describedby": "api-key-hint signin-error",
    dataset: { testid: "api-key-input" },
  });
  const reveal = h(
    "button",
    { type: "button", class: "btn ghost icon-only", "aria-label": "Show API key", "aria-pressed": "false" },
    icon("eye"),
  );
  const error = h("p", { id: "signin-error", class: "field-error", role: "alert" });
  const submit = h(
    "button",
    { type: "submit", class: "btn primary wide", dataset: { testid: "signin-submit" } },
    "Sign in",
  );
  const form = h(
    "form",
    { class: "card signin", novalidate: true, dataset: { testid: "signin-form" } },
    h("div", { class: "signin-mark" }, icon("logo")),
    h("h1", {}, "Sign in to Lookout"),
    h("p", { class: "muted" }, lede || "Watch your resources come to life, step by step."),
    h("label", { for: "api-key" }, "API key"),
    h("div", { class: "input-row" }, input, reveal),
    h(
      "p",
      { id: "api-key-hint", class: "hint" },
      "Running the demo? ",
      h("code", {}, "lookout demo"),
      " prints your key. The key stays in this tab only.",
    ),
    error,
    submit,
  );

  reveal.addEventListener("click", () => {
    const shown = input.type === "text";
    input.type = shown ? "password" : "text";
    reveal.setAttribute("aria-pressed", String(!shown));
    reveal.setAttribute("aria-label", shown ? "Show API key" : "Hide API key");
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    error.textContent = "";
    input.removeAttribute("aria-invalid");
    if (!key) {
      error.textContent = "Enter your API key.";
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    submit.disabled = true;
    submit.textContent = "Signing in…";
    try {
      // Any authenticated read tells whether the key is good.
      await new Api({ getKey: () => key }).subscriptions();
      credentials.set(key);
      container.replaceChildren();
      onSignedIn();
    } catch (failure) {
      const message =
        failure instanceof ApiError && failure.status === 401
          ? "That API key was not accepted. Check it and try again."
          : failure.message;
      error.textContent = message;
      input.setAttribute("aria-invalid", "true");
      input.focus();
    } finally {
      submit.disabled = false;
      submit.textContent = "Sign in";
    }
  });

  container.replaceChildren(form);
  input.focus();
}
