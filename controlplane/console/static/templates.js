// The templates page: the list (#/templates) with a form for a new template (admins), and one
// template (#/templates/NAME) with its source, the editor and delete (admins), a dry-run render
// form, the history with any version, a side-by-side diff and rollback (admins). Every write
// names the version the editor started from (If-Match), so a change made meanwhile by someone
// else is refused (412) and shown, never overwritten; a refused text stays in the editor.

import { api, ApiError, path } from "./api.js";
import { errorBox, h, replace, table, when } from "./dom.js";
import { parameterFields, showFieldErrors } from "./params.js";

const BASE = "/api/v1/templates";
let flashNext = null;  // a message for the next view, after a change that navigates away

export async function render(main, args, context) {
  const page = h("div", { id: "tpl-page" });
  main.append(page);
  const flash = flashNext;
  flashNext = null;
  if (args[0]) {
    await showTemplate(page, args[0], context, flash);
  } else {
    await showList(page, context, flash);
  }
}

function flashBox(message) {
  return message ? h("div", { class: "ok", id: "tpl-flash", role: "status" }, message) : null;
}

// --- the list --------------------------------------------------------------------------------

async function showList(page, context, flash) {
  const { items } = await api("GET", BASE);
  const rows = items.filter((item) => !item.deleted);
  replace(page,
    flashBox(flash),
    h("p", { class: "muted" }, context.admin
      ? "Admins edit templates here; every save is a new version, and any version can be restored."
      : "The templates your project may use: view them and try them with a dry-run render."),
    rows.length ? table([
      ["Name", (t) => h("a", { href: `#/templates/${encodeURIComponent(t.name)}`,
        class: "tpl-link" }, t.name)],
      ["Kind", (t) => t.kind],
      ["Version", (t) => String(t.version)],
      ["Last changed by", (t) => t.author],
      ["When", (t) => when(t.created_at)],
    ], rows, { id: "tpl-list" })
      : h("p", { class: "muted", id: "tpl-list-empty" }, "No templates."),
    context.admin ? createSection(context, rows) : null);
}

// A new template (admins): its text starts as a copy of an existing one, renamed.
function createSection(context, rows) {
  const name = h("input", { id: "tpl-new-name", autocomplete: "off", spellcheck: "false",
    placeholder: "lower-case-name" });
  const from = h("select", { id: "tpl-new-from", "aria-label": "Start from" },
    rows.map((t) => h("option", { value: t.name }, t.name)));
  const ui = {
    textarea: h("textarea", { id: "tpl-new-source", class: "code", rows: 16, spellcheck: "false",
      "aria-label": "New template source" }),
    status: h("div", { id: "tpl-status", role: "status" }),
    lines: h("div", { id: "tpl-lines-box" }),
  };
  const copy = async () => {
    try {
      const t = await api("GET", templatePath(from.value));
      const newName = name.value.trim() || "new-name";
      ui.textarea.value = t.source.replace(/^name:.*$/m, `name: ${newName}`);
    } catch (error) {
      replace(ui.status, errorBox(error));
    }
  };
  const create = async () => {
    const source = ui.textarea.value;
    if (!name.value.trim()) {
      replace(ui.status, errorBox(new Error("Give the new template a name.")));
      return;
    }
    replace(ui.status, h("p", { class: "muted" }, "Creating…"));
    replace(ui.lines);
    try {
      const saved = await api("PUT", templatePath(name.value.trim()), {
        body: { source }, headers: { "If-None-Match": "*" } });
      flashNext = `Created ${saved.name} as version ${saved.version}.`;
      context.navigate(`#/templates/${encodeURIComponent(saved.name)}`);
    } catch (error) {
      if (error instanceof ApiError && error.status === 412) {
        replace(ui.status, errorBox(new Error(`${name.value.trim()} exists already: ` +
          "edit it instead (your text is kept here).")));
      } else if (error instanceof ApiError && error.errors.length) {
        showSourceErrors(ui, error, source);
      } else {
        replace(ui.status, errorBox(error));
      }
    }
  };
  return h("section", { id: "tpl-new" },
    h("h2", {}, "New template"),
    h("div", { class: "row" },
      h("label", {}, "Name ", name),
      h("label", {}, "start from a copy of ", from),
      h("button", { type: "button", class: "secondary", id: "tpl-new-copy", onclick: copy },
        "Copy")),
    ui.textarea,
    h("button", { type: "button", id: "tpl-new-create", onclick: create }, "Create"),
    ui.status, ui.lines);
}

// --- one template ----------------------------------------------------------------------------

function templatePath(name, ...rest) {
  return `${BASE}/${path(name, ...rest)}`;
}

// Renders the whole template view; `flash` is a message to show on top (e.g. after a save).
async function showTemplate(page, name, context, flash) {
  const template = await api("GET", templatePath(name));
  const state = { name, base: template, context, page };
  const editor = context.admin ? editorSection(state) : sourceSection(template);
  replace(page,
    h("p", {}, h("a", { href: "#/templates", id: "tpl-back" }, "← All templates")),
    flashBox(flash),
    metaSection(template),
    editor,
    renderSection(state),
    await historySection(state));
}

function metaSection(t) {
  return h("section", { id: "tpl-meta" },
    h("h2", {}, `${t.name} `, h("span", { class: "muted" }, `(${t.kind} template)`)),
    t.description ? h("p", {}, t.description) : null,
    h("dl", { class: "tpl-facts" },
      h("dt", {}, "Version"), h("dd", { id: "tpl-version" }, String(t.version)),
      h("dt", {}, "ETag"), h("dd", {}, h("code", { id: "tpl-etag" }, t.etag)),
      h("dt", {}, "Saved by"),
      h("dd", { id: "tpl-author" }, `${t.author}, ${when(t.created_at)}`)));
}

function sourceSection(t) {
  return h("section", { id: "tpl-source-section" },
    h("h2", {}, "Source"),
    h("p", { class: "muted" }, "Only admins edit templates."),
    numberedSource(t.source, new Map(), "tpl-source-view"));
}

// The source as numbered lines; `marks` maps a line number to the messages at that line.
function numberedSource(source, marks, id) {
  const lines = source.split("\n");
  if (lines.length > 1 && lines[lines.length - 1] === "") {
    lines.pop();
  }
  return h("ol", { class: "tpl-lines", id }, lines.map((text, index) => {
    const number = index + 1;
    const messages = marks.get(number);
    return h("li", { "data-line": number, class: messages ? "bad" : null },
      h("span", { class: "num" }, String(number)),
      h("code", {}, text || " "),
      messages ? h("div", { class: "tpl-line-error" }, messages.join("; ")) : null);
  }));
}

// --- the editor (admins) -----------------------------------------------------------------------

function editorSection(state) {
  const textarea = h("textarea", { id: "tpl-source", class: "code", rows: 24, spellcheck: "false",
    "aria-label": "Template source", oninput: () => markDirty(state) });
  textarea.value = state.base.source;
  state.textarea = textarea;
  state.status = h("div", { id: "tpl-status", role: "status" });
  state.lines = h("div", { id: "tpl-lines-box" });
  state.based = h("p", { class: "muted", id: "tpl-based-on" });
  showBase(state);
  return h("section", { id: "tpl-editor" },
    h("h2", {}, "Edit"),
    state.based,
    h("label", { for: "tpl-source" },
      "Source (YAML: name, kind, description, parameters, site, body)"),
    textarea,
    h("div", { class: "row" },
      h("button", { id: "tpl-save", type: "button", onclick: () => save(state) },
        "Save as a new version"),
      h("button", { id: "tpl-discard", type: "button", class: "secondary",
        onclick: () => reloadLatest(state) }, "Discard my changes"),
      deleteControl(state)),
    state.status,
    state.lines);
}

// Deleting asks once more, inline; the history stays (the API writes a tombstone version).
function deleteControl(state) {
  const box = h("span", { id: "tpl-delete-box" });
  const confirmDelete = async () => {
    try {
      await api("DELETE", templatePath(state.name), { headers: { "If-Match": state.base.etag } });
      flashNext = `Deleted ${state.name} (its history stays on record).`;
      state.context.navigate("#/templates");
    } catch (error) {
      await refused(state, error, state.textarea.value, "deleted");
    }
  };
  const ask = () => replace(box, `Delete ${state.name}? `,
    h("button", { type: "button", id: "tpl-delete-confirm", class: "danger",
      onclick: confirmDelete }, "Yes, delete it"), " ",
    h("button", { type: "button", class: "secondary", onclick: () => replace(box, offer()) },
      "Keep it"));
  const offer = () => h("button", { type: "button", id: "tpl-delete", class: "secondary",
    onclick: ask }, "Delete…");
  replace(box, offer());
  return box;
}

function showBase(state) {
  replace(state.based, `Editing from version ${state.base.version}; saving checks that nobody ` +
    "saved another version since.");
}

function markDirty(state) {
  state.dirty = state.textarea.value !== state.base.source;
}

async function save(state) {
  const source = state.textarea.value;
  replace(state.status, h("p", { class: "muted" }, "Saving…"));
  replace(state.lines);
  try {
    const saved = await api("PUT", templatePath(state.name), {
      body: { source }, headers: { "If-Match": state.base.etag } });
    await showTemplate(state.page, state.name, state.context,
      `Saved as version ${saved.version}.`);
  } catch (error) {
    await refused(state, error, source);
  }
}

// A refused change (`what`: "saved", "deleted"): the text stays in the editor whatever happened.
async function refused(state, error, source, what = "saved") {
  if (error instanceof ApiError && error.status === 412) {
    await showConflict(state, what);
  } else if (error instanceof ApiError && error.errors.length) {
    showSourceErrors(state, error, source);
  } else {
    replace(state.status, errorBox(error));
  }
}

// Field errors of a refused source: listed with their file lines, the lines marked in a numbered
// copy of the text, and the first one selected in the editor. `ui` = {textarea, status, lines}.
function showSourceErrors(ui, error, source) {
  const marks = new Map();
  for (const e of error.errors) {
    if (e.line) {
      marks.set(e.line, [...(marks.get(e.line) || []), `${e.field}: ${e.message}`]);
    }
  }
  const items = error.errors.map((e) => h("li", { class: "tpl-error", "data-field": e.field,
    "data-line": e.line || null },
  h("strong", {}, e.field), e.line ? h("span", { class: "tpl-at" }, ` line ${e.line}`) : null,
  `: ${e.message} `,
  e.line ? h("button", { type: "button", class: "secondary tpl-goto",
    onclick: () => selectLine(ui.textarea, e.line) }, `Show line ${e.line}`) : null));
  replace(ui.status, h("div", { class: "error", role: "alert", id: "tpl-errors" },
    "Not saved: the template has errors. Your text is unchanged in the editor.",
    h("ul", {}, items)));
  replace(ui.lines, h("p", { class: "muted" }, "The text you tried to save, line by line:"),
    numberedSource(source, marks, "tpl-lines"));
  const first = ui.lines.querySelector("li.bad");
  if (first) {
    first.scrollIntoView({ block: "nearest" });
  }
  const firstLine = error.errors.find((e) => e.line);
  if (firstLine) {
    selectLine(ui.textarea, firstLine.line);
  }
}

// Selects line `number` (1 = first) in the textarea and scrolls it into view.
function selectLine(textarea, number) {
  const lines = textarea.value.split("\n");
  const index = Math.min(Math.max(number, 1), lines.length) - 1;
  const start = lines.slice(0, index).reduce((sum, line) => sum + line.length + 1, 0);
  textarea.focus();
  textarea.setSelectionRange(start, start + lines[index].length);
  const lineHeight = parseFloat(getComputedStyle(textarea).lineHeight) || 16;
  textarea.scrollTop = Math.max(0, (index - 3) * lineHeight);
}

async function showConflict(state, what) {
  let latest;
  try {
    latest = await api("GET", templatePath(state.name));
  } catch (error) {  // deleted meanwhile, most likely
    replace(state.status, h("div", { class: "error tpl-conflict", role: "alert",
      id: "tpl-conflict" }, `Not ${what}: this template was changed by someone else since you ` +
      `opened it, and cannot be read now (${error.message}). Your text is still in the editor.`));
    return;
  }
  const from = state.base;
  const diffBox = h("div", { id: "tpl-conflict-diff-box" });
  replace(state.status, h("div", { class: "error tpl-conflict", role: "alert", id: "tpl-conflict" },
    h("p", {}, h("strong", {}, `Not ${what}: this template was changed by someone else since you ` +
      "opened it.")),
    h("p", {}, `You started from version ${from.version}; the latest is version ${latest.version}` +
      ` (${latest.author}, ${when(latest.created_at)}). Your text is still in the editor.`),
    h("div", { class: "row" },
      h("button", { type: "button", id: "tpl-conflict-diff", class: "secondary",
        onclick: () => showDiffInto(diffBox, state.name, from.version, latest.version) },
      `Show what changed (v${from.version} → v${latest.version})`),
      h("button", { type: "button", id: "tpl-conflict-reload", class: "secondary",
        onclick: () => reloadLatest(state) }, "Reload the latest (drops your text)"),
      h("button", { type: "button", id: "tpl-conflict-rebase", class: "secondary",
        onclick: () => rebase(state, latest) },
      `Keep my text and edit on top of v${latest.version}`)),
    diffBox));
}

async function reloadLatest(state) {
  await showTemplate(state.page, state.name, state.context, null);
}

// The user has seen the newer version and chooses to replace it with their text: their next save
// names the latest version.
function rebase(state, latest) {
  state.base = latest;
  showBase(state);
  markDirty(state);
  replace(state.status, h("div", { class: "ok", role: "status" },
    `Your text now replaces version ${latest.version} when you save.`));
}

// --- dry-run render ----------------------------------------------------------------------------

function renderSection(state) {
  const parameters = parameterFields("tpl", state.base.parameters);
  const output = h("div", { id: "tpl-render-output" });
  // The API checks the values (bounds included) and names each field at fault.
  const form = h("form", { id: "tpl-render", novalidate: true, onsubmit: (event) => {
    event.preventDefault();
    dryRun(state, parameters, output);
  } },
  parameters.element,
  h("button", { type: "submit", id: "tpl-render-submit" }, "Render (dry run)"));
  return h("section", { id: "tpl-render-section" },
    h("h2", {}, "Dry-run render"),
    h("p", { class: "muted" }, "Fields start at their defaults; an emptied one takes its " +
      "default; lists are comma-separated. Session values (keys, endpoints) are samples."),
    form, output);
}

async function dryRun(state, parameters, output) {
  const { params, errors } = parameters.read();
  showFieldErrors(parameters.fields, errors);
  if (errors.length) {
    replace(output);
    return;
  }
  replace(output, h("p", { class: "muted" }, "Rendering…"));
  try {
    const result = await api("POST", templatePath(state.name, "render"), { body: { params } });
    replace(output, h("p", { class: "ok" }, `Rendered version ${result.version}:`),
      h("pre", { id: "tpl-render-text" }, result.text));
  } catch (error) {
    showFieldErrors(parameters.fields, error instanceof ApiError ? error.errors : []);
    replace(output, errorBox(error));
  }
}

// --- history, versions, diff and rollback ------------------------------------------------------

async function historySection(state) {
  const { items } = await api("GET", templatePath(state.name, "versions"));
  const versions = [...items].reverse();  // newest first
  const viewer = h("div", { id: "tpl-version-view" });
  const diffBox = h("div", { id: "tpl-diff-box" });
  const status = h("div", { id: "tpl-history-status", role: "status" });
  const choices = (selected) => versions.map((v) => h("option",
    { value: v.version, selected: v.version === selected }, `v${v.version}`));
  const older = versions.length > 1 ? versions[1].version : versions[0].version;
  const from = h("select", { id: "tpl-diff-from", "aria-label": "From version" }, choices(older));
  const to = h("select", { id: "tpl-diff-to", "aria-label": "To version" },
    choices(versions[0].version));
  const columns = [
    ["Version", (v) => `v${v.version}`],
    ["Author", (v) => v.author],
    ["When", (v) => when(v.created_at)],
    ["", (v) => (v.deleted ? h("span", { class: "muted" }, "deleted") : h("span", {},
      h("button", { type: "button", class: "secondary tpl-view", "data-version": v.version,
        onclick: () => viewVersion(state.name, v.version, viewer) }, "View"),
      state.context.admin && v.version !== state.base.version
        ? h("button", { type: "button", class: "secondary tpl-rollback", "data-version": v.version,
          onclick: () => rollback(state, v.version, status) }, `Roll back to v${v.version}`)
        : null))],
  ];
  return h("section", { id: "tpl-history-section" },
    h("h2", {}, "History"),
    table(columns, versions, { id: "tpl-history" }),
    status,
    h("div", { class: "row" },
      h("label", {}, "Compare ", from), h("label", {}, " with ", to),
      h("button", { type: "button", id: "tpl-diff-show", class: "secondary",
        onclick: () => showDiffInto(diffBox, state.name, Number(from.value), Number(to.value)) },
      "Show side by side")),
    diffBox,
    viewer);
}

async function viewVersion(name, version, viewer) {
  try {
    const v = await api("GET", templatePath(name, "versions", version));
    replace(viewer, h("h3", {}, `Version ${v.version} (${v.author}, ${when(v.created_at)})`),
      numberedSource(v.source, new Map(), "tpl-version-source"));
  } catch (error) {
    replace(viewer, errorBox(error));
  }
}

async function rollback(state, version, status) {
  if (state.dirty) {
    replace(status, h("div", { class: "error", role: "alert" }, "The editor holds unsaved " +
      "changes: save or discard them before rolling back."));
    return;
  }
  try {
    const saved = await api("POST", templatePath(state.name, "rollback"), {
      body: { version }, headers: { "If-Match": state.base.etag } });
    await showTemplate(state.page, state.name, state.context,
      `Rolled back: version ${saved.version} carries version ${version}'s source.`);
  } catch (error) {
    if (error instanceof ApiError && error.status === 412) {
      replace(status, h("div", { class: "error", role: "alert", id: "tpl-rollback-conflict" },
        "Not rolled back: this template was changed by someone else since you opened it. ",
        h("button", { type: "button", class: "secondary", onclick: () => reloadLatest(state) },
          "Reload the latest")));
    } else {
      replace(status, errorBox(error));
    }
  }
}

async function showDiffInto(box, name, from, to) {
  replace(box, h("p", { class: "muted" }, "Comparing…"));
  try {
    const query = `?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}`;
    const result = await api("GET", templatePath(name, "diff") + query);
    replace(box, sideBySide(result));
    box.scrollIntoView({ block: "nearest" });
  } catch (error) {
    replace(box, errorBox(error));
  }
}

// The API's unified diff as two columns: the older version on the left (removed lines marked),
// the newer on the right (added lines marked), changed lines side by side.
function sideBySide(result) {
  const heading = h("h3", {}, `v${result.from_version} ↔ v${result.to_version}`);
  const rows = diffRows(result.diff);
  if (!rows.length) {
    return h("div", { id: "tpl-diff" }, heading,
      h("p", { class: "muted", id: "tpl-diff-same" }, "The two versions have the same source."));
  }
  const cell = (side, kind) => [
    h("td", { class: "num" }, side ? String(side.n) : ""),
    h("td", { class: `code ${side ? kind : "empty"}` }, side ? side.text : ""),
  ];
  return h("div", { id: "tpl-diff" }, heading, h("table", { class: "sbs" },
    h("colgroup", {}, ["num", "code", "num", "code"].map((kind) => h("col", { class: kind }))),
    h("thead", {}, h("tr", {}, h("th", { colspan: 2 }, `v${result.from_version}`),
      h("th", { colspan: 2 }, `v${result.to_version}`))),
    h("tbody", {}, rows.map((row) => (row.hunk
      ? h("tr", { class: "hunk" }, h("td", { colspan: 4 }, row.hunk))
      : h("tr", {}, cell(row.left, row.same ? "same" : "del"),
        cell(row.right, row.same ? "same" : "add")))))));
}

function diffRows(diff) {
  const rows = [];
  let removed = [];
  let added = [];
  let left = 0;
  let right = 0;
  let started = false;  // the "---" and "+++" file lines come before the first hunk
  const flush = () => {
    for (let i = 0; i < Math.max(removed.length, added.length); i += 1) {
      rows.push({ left: removed[i], right: added[i] });
    }
    removed = [];
    added = [];
  };
  for (const line of diff.split("\n")) {
    const hunk = /^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@/.exec(line);
    if (hunk) {
      flush();
      started = true;
      [left, right] = [Number(hunk[1]), Number(hunk[2])];
      rows.push({ hunk: `lines ${left} / ${right}` });
    } else if (!started || line.startsWith("\\")) {
      continue;
    } else if (line.startsWith("-")) {
      if (added.length) {
        flush();
      }
      removed.push({ n: left++, text: line.slice(1) });
    } else if (line.startsWith("+")) {
      added.push({ n: right++, text: line.slice(1) });
    } else if (line.startsWith(" ")) {
      flush();
      rows.push({ left: { n: left++, text: line.slice(1) }, right: { n: right++,
        text: line.slice(1) }, same: true });
    }
  }
  flush();
  return rows;
}
