// The projects page. Admins list, create and edit projects and issue and revoke their tokens;
// a project member sees their own project and its tokens. An issued token is shown once, in this
// page's memory only: it is never written to any storage and is gone when the page is left.

import { api, path } from "./api.js";
import { errorBox, h, replace, table, when } from "./dom.js";

const QUOTAS = ["tokens", "sessions", "consumers"];

function names(text) {
  return text.split(/[\s,]+/).filter(Boolean);
}

function tokenStatus(token) {
  if (token.revoked_at) {
    return "revoked";
  }
  return new Date(token.expires_at) <= new Date() ? "expired" : "live";
}

// --- the list (admins) ------------------------------------------------------------------------

function createForm(context) {
  const name = h("input", { id: "project-name", required: true, maxlength: 63,
    pattern: "[a-z0-9][a-z0-9_\\-]{0,62}", placeholder: "e.g. ncem-4d" });
  const templates = h("input", { id: "project-templates", size: 50,
    placeholder: "template names, comma-separated (none: the policy's defaults)" });
  const status = h("div", { id: "project-create-status" });
  const form = h("form", { id: "project-create", onsubmit: async (event) => {
    event.preventDefault();
    try {
      const created = await api("POST", "/api/v1/projects",
        { body: { name: name.value.trim(), allowed_templates: names(templates.value) } });
      context.navigate(`#/projects/${encodeURIComponent(created.name)}`);
    } catch (error) {
      replace(status, errorBox(error));  // the form keeps what was typed
    }
  } },
  h("label", { for: "project-name" }, "Name"), name,
  h("label", { for: "project-templates" }, "Allowed templates"), templates,
  h("button", { type: "submit" }, "Create project"));
  return [h("h2", {}, "New project"), form, status];
}

async function renderList(main, context) {
  const { items } = await api("GET", "/api/v1/projects");
  main.append(
    items.length ? table([
      ["Project", (p) => h("a", { href: `#/projects/${encodeURIComponent(p.name)}`,
        class: "project-link" }, p.name)],
      ["Allowed templates", (p) => p.allowed_templates.join(", ") || "policy defaults"],
      ["Quotas", (p) => quotaText(p.quotas)],
      ["Created", (p) => when(p.created_at)],
    ], items, { id: "projects-list" }) : h("p", { id: "projects-list", class: "muted" },
      "No projects yet."),
    ...createForm(context));
}

function quotaText(quotas) {
  const set = Object.entries(quotas).map(([name, value]) => `${name} ${value}`);
  return set.join(", ") || "policy defaults";
}

// --- one project ------------------------------------------------------------------------------

function details(project) {
  return h("dl", { id: "project-detail" },
    h("dt", {}, "Allowed templates"),
    h("dd", { class: "templates" }, project.allowed_templates.join(", ") || "the policy's defaults"),
    h("dt", {}, "Quotas"), h("dd", { class: "quotas" }, quotaText(project.quotas)),
    h("dt", {}, "Older tokens cut off before"),
    h("dd", { class: "not-before" }, project.not_before ? when(project.not_before) : "never"),
    h("dt", {}, "Created"), h("dd", {}, when(project.created_at)));
}

function editForm(project, defaults, onSaved) {
  const templates = h("input", { id: "edit-templates", size: 50,
    value: project.allowed_templates.join(", ") });
  const quotaNames = [...new Set([...QUOTAS, ...Object.keys(project.quotas)])];
  const inputs = Object.fromEntries(quotaNames.map((name) => [name, h("input", {
    id: `edit-quota-${name}`, type: "number", min: 0, max: 1000000000, step: 1,
    value: project.quotas[name] ?? "",
    placeholder: defaults[name] !== undefined ? `policy: ${defaults[name]}` : "policy default",
  })]));
  const status = h("div", { id: "project-edit-status" });
  const form = h("form", { id: "project-edit", onsubmit: async (event) => {
    event.preventDefault();
    const quotas = {};
    for (const [name, input] of Object.entries(inputs)) {
      if (input.value !== "") {
        quotas[name] = Number(input.value);
      }
    }
    try {
      const saved = await api("PATCH", `/api/v1/projects/${path(project.name)}`,
        { body: { allowed_templates: names(templates.value), quotas } });
      replace(status, h("div", { class: "ok", role: "status" }, "Saved."));
      onSaved(saved);
    } catch (error) {
      replace(status, errorBox(error));  // the form keeps what was typed
    }
  } },
  h("label", { for: "edit-templates" }, "Allowed templates (empty: the policy's defaults)"),
  templates,
  h("fieldset", {}, h("legend", {}, "Quotas (empty: the policy's default)"),
    quotaNames.map((name) => h("label", { class: "field" }, h("span", {}, name), inputs[name]))),
  h("button", { type: "submit" }, "Save changes"));
  return [h("h2", {}, "Change this project"), form, status];
}

function revokeCell(token, onRevoked) {
  if (tokenStatus(token) !== "live") {
    return "";
  }
  const cell = h("span", { class: "revoke" });
  const ask = () => replace(cell,
    h("button", { type: "button", class: "revoke-token secondary", onclick: again },
      "Revoke…"));
  // The second step: a button of its own, so one stray click never revokes a token.
  const again = () => replace(cell,
    h("button", { type: "button", class: "confirm-revoke", onclick: revoke },
      `Revoke ${token.subject}'s token now`), " ",
    h("button", { type: "button", class: "cancel-revoke secondary", onclick: ask }, "Cancel"));
  const revoke = async () => {
    try {
      await api("DELETE", `/api/v1/tokens/${path(token.jti)}`);
      await onRevoked();
    } catch (error) {
      replace(cell, errorBox(error));
    }
  };
  ask();
  return cell;
}

function tokensTable(tokens, admin, onRevoked) {
  if (!tokens.length) {
    return h("p", { id: "project-tokens", class: "muted" }, "No tokens.");
  }
  const columns = [
    ["Subject", (t) => t.subject],
    ["Kind", (t) => t.kind],
    ["Status", (t) => h("span", { class: `token-status status-${tokenStatus(t)}` },
      tokenStatus(t))],
    ["Scope", (t) => t.scope],
    ["Issued", (t) => when(t.issued_at)],
    ["Expires", (t) => when(t.expires_at)],
    ["Id", (t) => h("code", {}, t.jti)],
  ];
  if (admin) {
    columns.push(["", (t) => revokeCell(t, onRevoked)]);
  }
  const rows = [...tokens].sort((a, b) => b.issued_at.localeCompare(a.issued_at));
  const element = table(columns, rows, { id: "project-tokens" });
  element.querySelectorAll("tbody tr").forEach((row, index) => {
    row.dataset.jti = rows[index].jti;
  });
  return element;
}

function issueForm(project, shown, onIssued) {
  const subject = h("input", { id: "issue-subject", required: true, maxlength: 200,
    placeholder: "who holds it, e.g. bob" });
  const scope = h("input", { id: "issue-scope", size: 50,
    placeholder: "space-separated (empty: every scope the policy grants project tokens)" });
  const ttl = h("input", { id: "issue-ttl", type: "number", min: 1, step: 1,
    placeholder: "seconds (empty: the policy's longest)" });
  const status = h("div", { id: "token-issue-status" });
  const form = h("form", { id: "token-issue", onsubmit: async (event) => {
    event.preventDefault();
    const body = { subject: subject.value.trim() };
    if (scope.value.trim()) {
      body.scope = names(scope.value).join(" ");
    }
    if (ttl.value !== "") {
      body.ttl = Number(ttl.value);
    }
    try {
      const issued = await api("POST", `/api/v1/projects/${path(project.name)}/tokens`, { body });
      replace(status);
      form.reset();
      showOnce(shown, issued);
      await onIssued();
    } catch (error) {
      replace(status, errorBox(error));
    }
  } },
  h("label", { for: "issue-subject" }, "Subject"), subject,
  h("label", { for: "issue-scope" }, "Scope"), scope,
  h("label", { for: "issue-ttl" }, "Lifetime"), ttl,
  h("button", { type: "submit" }, "Issue token"));
  return [h("h2", {}, "Issue a token"), form, status];
}

// The token itself, once: only in this element, never kept anywhere else.
function showOnce(shown, issued) {
  const field = h("textarea", { id: "issued-token", class: "token-once", rows: 6, readonly: true,
    spellcheck: "false", autocomplete: "off" });
  field.value = issued.token;
  field.addEventListener("focus", () => field.select());
  replace(shown, h("div", { class: "warning", role: "alert" },
    h("strong", {}, `Token for ${issued.subject}, valid until ${when(issued.expires_at)}. `),
    "Copy it now (select the field, then Ctrl+C or ⌘C) and hand it over safely: ",
    "it is not shown again and cannot be recovered, only revoked.",
    field,
    h("button", { type: "button", class: "secondary", id: "issued-token-done",
      onclick: () => replace(shown) }, "Done, hide it")));
}

// The quotas the policy gives a project that sets none of its own.
function policyQuotas(policy, name) {
  const override = policy.quotas.projects[name] || {};
  const values = { ...policy.quotas.defaults };
  for (const [quota, value] of Object.entries(override)) {
    if (value !== null) {
      values[quota] = value;
    }
  }
  return values;
}

async function renderProject(main, name, context) {
  const project = await api("GET", `/api/v1/projects/${path(name)}`);
  const detail = h("div", {}, details(project));
  const tokens = h("div", {});
  const loadTokens = async () => {
    const { items } = await api("GET", `/api/v1/projects/${path(name)}/tokens`);
    replace(tokens, tokensTable(items, context.admin, loadTokens));
  };
  replace(main, h("h1", {}, `Project ${project.name}`));
  if (context.admin) {
    main.append(h("p", {}, h("a", { href: "#/projects" }, "← all projects")));
  }
  main.append(detail);
  await loadTokens();
  if (!context.admin) {
    main.append(h("h2", {}, "Tokens"), tokens);
    return;
  }
  const defaults = policyQuotas((await api("GET", "/api/v1/policies")).policy, project.name);
  const shown = h("div", { id: "issued" });
  main.append(
    ...editForm(project, defaults, (saved) => replace(detail, details(saved))),
    h("h2", {}, "Tokens"), tokens,
    ...issueForm(project, shown, loadTokens), shown);
}

export async function render(main, args, context) {
  if (!context.admin) {
    // A member's token names one project: the only one it may see.
    await renderProject(main, context.session.project, context);
  } else if (args[0]) {
    await renderProject(main, args[0], context);
  } else {
    await renderList(main, context);
  }
}
