// The audit page (admins only): the audit log newest first, filtered by principal, action,
// decision and time, paged back (older) and forward (newer), and a check of its hash chain.

import { api } from "./api.js";
import { errorBox, h, replace, table, when } from "./dom.js";

const SIZES = [25, 50, 100];

export async function render(main) {
  const status = h("div", { id: "audit-status", role: "status" });
  const verification = h("div", { id: "audit-verification", role: "status" });
  const results = h("section", { id: "audit-results" });
  const fields = {
    principal: h("input", { id: "audit-principal", name: "principal", type: "search",
      placeholder: "alice, @project, via console", maxlength: 200 }),
    action: h("input", { id: "audit-action", name: "action", type: "search",
      placeholder: "sessions:open", maxlength: 64 }),
    decision: h("select", { id: "audit-decision", name: "decision" },
      h("option", { value: "" }, "any"), h("option", { value: "allow" }, "allow"),
      h("option", { value: "deny" }, "deny")),
    since: h("input", { id: "audit-since", name: "since", type: "datetime-local", step: 1 }),
    until: h("input", { id: "audit-until", name: "until", type: "datetime-local", step: 1 }),
    limit: h("select", { id: "audit-limit", name: "limit" },
      SIZES.map((size) => h("option", { value: size, selected: size === 50 }, String(size)))),
  };
  const older = h("button", { id: "audit-older", type: "button", class: "secondary" }, "Older");
  const newer = h("button", { id: "audit-newer", type: "button", class: "secondary" }, "Newer");
  const verify = h("button", { id: "audit-verify", type: "button" }, "Verify chain");
  const label = (text, field) => h("label", { class: "audit-field" }, text, field);
  const form = h("form", { id: "audit-filter", class: "audit-filter" },
    label("Principal contains", fields.principal), label("Action", fields.action),
    label("Decision", fields.decision), label("Since", fields.since),
    label("Until", fields.until), label("Per page", fields.limit),
    h("div", { class: "row" }, h("button", { type: "submit" }, "Filter"),
      h("button", { id: "audit-clear", type: "reset", class: "secondary" }, "Clear")));
  main.append(h("div", { class: "row" }, verify, verification), form, status, results,
    h("div", { class: "row" }, newer, older));

  // The page on show: its records (newest first) and whether it is the newest there is.
  let shown = { items: [], newest: true };

  async function load(page) {
    let query;
    try {
      query = filters(fields);
    } catch (error) {
      replace(status, errorBox(error));
      return;
    }
    try {
      const limit = Number(fields.limit.value);
      const newest = page.after === undefined && page.before === undefined;
      let items;
      if (page.after !== undefined) {
        // Newer: the records just after this page, oldest first, shown newest first.
        const answer = await api("GET", `/api/v1/audit?${new URLSearchParams({
          ...query, limit, after: page.after })}`);
        items = answer.items.reverse();
        if (items.length < limit) {  // reached the newest: show the newest full page instead
          return load({});
        }
      } else {
        const params = { ...query, limit, order: "desc" };
        if (page.before !== undefined) {
          params.before = page.before;
        }
        items = (await api("GET", `/api/v1/audit?${new URLSearchParams(params)}`)).items;
        if (!items.length && page.before !== undefined) {
          replace(status, h("p", { class: "muted" }, "No older records."));
          older.disabled = true;
          return;
        }
      }
      shown = { items, newest };
      replace(status);
      replace(results, items.length ? recordTable(items)
        : h("p", { class: "muted", id: "audit-empty" }, "No record matches."));
      older.disabled = items.length < limit;
      newer.disabled = newest;
    } catch (error) {
      replace(status, errorBox(error));
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    load({});
  });
  form.addEventListener("reset", () => setTimeout(() => load({}), 0));
  older.addEventListener("click", () => {
    const last = shown.items[shown.items.length - 1];
    if (last) {
      load({ before: last.seq });
    }
  });
  newer.addEventListener("click", () => {
    const first = shown.items[0];
    load(first ? { after: first.seq } : {});
  });
  verify.addEventListener("click", () => verifyChain(verify, verification));
  await load({});
}

// The form's filters as query parameters; times typed in local time are sent in UTC.
function filters(fields) {
  const query = {};
  for (const name of ["principal", "action", "decision"]) {
    const value = fields[name].value.trim();
    if (value) {
      query[name] = value;
    }
  }
  for (const name of ["since", "until"]) {
    if (fields[name].value) {
      const time = new Date(fields[name].value);
      if (Number.isNaN(time.getTime())) {
        throw Object.assign(new Error("The time filter is not a date and time."),
          { errors: [{ field: name, message: "not a date and time" }] });
      }
      query[name] = time.toISOString();
    }
  }
  return query;
}

function recordTable(items) {
  const rows = table([
    ["#", (r) => r.seq],
    ["Time", (r) => h("time", { datetime: r.ts, title: r.ts }, when(r.ts))],
    ["Principal", (r) => r.principal],
    ["Action", (r) => r.action],
    ["Resource", (r) => r.resource],
    ["Decision", (r) => h("span", { class: `audit-${r.decision}` },
      r.count > 1 ? `${r.decision} ×${r.count}` : r.decision)],
    ["Rule", (r) => r.rule],
    ["Request id", (r) => h("code", {}, r.request_id)],
  ], items, { id: "audit-table" });
  rows.querySelectorAll("tbody tr").forEach((row, index) => {
    row.dataset.seq = String(items[index].seq);
  });
  return rows;
}

async function verifyChain(button, box) {
  button.disabled = true;
  replace(box, h("span", { class: "muted" }, "Verifying…"));
  try {
    const result = await api("GET", "/api/v1/audit/verify");
    const checked = `${result.records} records, checked against ${result.checkpoints} signed ` +
      "checkpoints";
    replace(box, result.ok
      ? h("div", { class: "ok", id: "audit-chain-ok" }, `Chain intact: ${checked}.`)
      : h("div", { class: "error", id: "audit-chain-broken" },
        `Chain broken at record ${result.first_bad_seq}: ${result.problem} (${checked}).`));
  } catch (error) {
    replace(box, errorBox(error));
  } finally {
    button.disabled = false;
  }
}
