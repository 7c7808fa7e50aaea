// Graph credentials: revealed once (the server rotates the password to answer), copied,
// then hidden for good.

import { copyText, h, icon } from "./render.js";

function field(label, value, { secret = false, copyLabel }) {
  const output = h("code", { class: secret ? "secret" : "" }, value);
  const copy = h(
    "button",
    { type: "button", class: "btn ghost small", "aria-label": copyLabel },
    icon("copy"),
    "Copy",
  );
  copy.addEventListener("click", async () => {
    try {
      await copyText(value);
      copy.lastChild.textContent = "Copied";
    } catch {
      copy.lastChild.textContent = "Select and copy";
    }
    window.setTimeout(() => {
      copy.lastChild.textContent = "Copy";
    }, 2000);
  });
  return h("div", { class: "cred-row" }, h("dt", {}, label), h("dd", {}, output, copy));
}

/** A ready command line; the DSN is URL-encoded, so single quotes hold it whole. */
function psqlCommand(dsn) {
  return `psql '${dsn}'`;
}

/** The panel showing `creds` ({host, port, database, user, password, dsn}); `onHide` removes it. */
export function credentialsPanel(subscriptionId, creds, onHide) {
  const hide = h("button", { type: "button", class: "btn secondary small" }, "I have saved them");
  hide.addEventListener("click", onHide);
  const heading = h("h4", { id: `cred-title-${subscriptionId}`, tabindex: "-1" }, "Connection details");
  return h(
    "section",
    {
      class: "credentials",
      "aria-labelledby": `cred-title-${subscriptionId}`,
      dataset: { testid: `credentials-${subscriptionId}` },
    },
    heading,
    h(
      "p",
      { class: "warning", role: "note" },
      icon("alert"),
      "Shown once. The password was just changed to show it to you; copy it now. " +
        "Revealing again sets a new password.",
    ),
    h(
      "dl",
      { class: "cred-list" },
      field("Host", creds.host, { copyLabel: "Copy host" }),
      field("Port", String(creds.port), { copyLabel: "Copy port" }),
      field("Database", creds.database, { copyLabel: "Copy database name" }),
      field("User", creds.user, { copyLabel: "Copy user name" }),
      field("Password", creds.password, { secret: true, copyLabel: "Copy password" }),
      field("Connection string", creds.dsn, { secret: true, copyLabel: "Copy connection string" }),
      field("psql", psqlCommand(creds.dsn), { secret: true, copyLabel: "Copy psql command" }),
    ),
    h("div", { class: "actions" }, hide),
  );
}
