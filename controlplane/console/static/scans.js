// The scans page: the recorded scan results (#/scans), one scan with its counters, loss manifest
// and pictures (#/scans/SESSION/SCAN), and, for a project member, opening a session and launching
// its consumer job, as `dsn sessions open` and `dsn jobs launch` do.

import { api, ApiError, path } from "./api.js";
import { errorBox, h, replace, table, when } from "./dom.js";
import { field, parameterFields, showFieldErrors, typedValue } from "./params.js";

const POLL_MS = 1000;
const JOB_ENDED = ["succeeded", "failed", "cancelled", "lost"];
const PICTURES = [
  ["bright-field.png", "Virtual bright field"],
  ["diffraction.png", "Diffraction pattern sum"],
];
const COUNTS = [
  ["Frames", "frames"],
  ["Electron events", "events"],
  ["Expected sectors", "expected_sectors"],
  ["Received sectors", "received_sectors"],
  ["Duplicate sectors", "duplicate_sectors"],
  ["Conflicting duplicates", "conflicting_duplicates"],
  ["Lost sectors", "lost_sectors"],
  ["Incomplete frames", "incomplete_frames"],
];

// The list's filters, kept while the console is open.
const filters = { project: "", session: "", limit: "100" };

export async function render(main, args, context) {
  if (args.length >= 2) {
    await scanPage(main, args[0], args[1], context);
  } else {
    await listPage(main, context);
  }
}

// --- the list ------------------------------------------------------------------------------------

async function listPage(main, context) {
  const sessionsBox = h("div", { id: "sessions" });
  const scansBox = h("div", { id: "scan-list" });
  const jobSession = h("select", { id: "job-session", required: true });
  main.append(h("h2", {}, "Sessions"));
  if (context.session.kind === "project") {
    const catalogue = templateCatalogue();
    main.append(openSessionForm(catalogue, context, async (opened) => {
      await showSessions(sessionsBox, jobSession, context);
      jobSession.value = opened.id;
    }), launchJobForm(catalogue, jobSession, context));
  } else {
    // Opening a session needs a project token: the session is the project's, its producer key
    // and quota too.
    main.append(h("p", { id: "sessions-admin-note", class: "muted" }, "Sessions are opened, " +
      "and their consumer jobs launched, by project members: sign in with a project token to " +
      "open one. As an admin you see every project's sessions and scans."));
  }
  main.append(sessionsBox, h("h2", {}, "Scan results"), scanFilters(context, scansBox), scansBox);
  await showSessions(sessionsBox, jobSession, context);
  context.every(3 * POLL_MS, () => showScans(scansBox));
}

async function showSessions(box, jobSession, context) {
  try {
    const { items } = await api("GET", "/api/v1/sessions");
    const open = items.filter((s) => s.state === "open");
    const chosen = jobSession.value;
    replace(jobSession, open.length ? open.map((s) => h("option", { value: s.id },
      `${s.id} (${s.template})`)) : h("option", { value: "" }, "(no open session: open one first)"));
    if (open.some((s) => s.id === chosen)) {
      jobSession.value = chosen;
    }
    replace(box, items.length ? table([
      ["Session", (s) => s.id],
      ["Project", (s) => s.project],
      ["Template", (s) => `${s.template} v${s.template_version}`],
      ["State", (s) => h("span", { class: `state-${s.state}` }, s.state)],
      ["Expires", (s) => when(s.expires_at)],
      ["Gateway", (s) => s.gateway.endpoint],
      ["Scans", (s) => h("a", { href: "#/scans", onclick: (event) => {
        event.preventDefault();
        filters.session = s.id;
        context.refresh();
      } }, "show its scans")],
    ], items, { id: "sessions-table" }) : h("p", { class: "muted" }, "No session yet."));
  } catch (error) {
    replace(box, errorBox(error));
  }
}

function scanFilters(context, box) {
  const project = h("input", { id: "filter-project", value: filters.project,
    placeholder: "every project", pattern: "[a-z0-9][a-z0-9-]*" });
  const session = h("input", { id: "filter-session", value: filters.session,
    placeholder: "every session" });
  const limit = h("input", { id: "filter-limit", type: "number", min: 1, max: 1000,
    value: filters.limit });
  return h("form", { id: "scan-filters", class: "filters", onsubmit: (event) => {
    event.preventDefault();
    filters.project = project.value.trim();
    filters.session = session.value.trim();
    filters.limit = limit.value || "100";
    showScans(box);
  } },
  context.admin ? [h("label", { for: "filter-project" }, "Project"), project] : null,
  h("label", { for: "filter-session" }, "Session"), session,
  h("label", { for: "filter-limit" }, "At most"), limit,
  h("button", { type: "submit" }, "Show"));
}

async function showScans(box) {
  const query = new URLSearchParams();
  for (const name of ["project", "session", "limit"]) {
    if (filters[name]) {
      query.set(name, filters[name]);
    }
  }
  try {
    const { items } = await api("GET", `/api/v1/scans?${query}`);
    replace(box, items.length ? table([
      ["Session", (r) => r.session],
      ["Scan", (r) => h("a", { href: `#/scans/${path(r.session, r.scan)}`, class: "scan-link" },
        String(r.scan))],
      ["Project", (r) => r.project],
      ["Status", (r) => h("span", { class: `status-${r.status}` }, r.status)],
      ["Source", (r) => r.source],
      ["Frames", (r) => r.frames],
      ["Lost sectors", (r) => r.lost_sectors],
      ["Reported", (r) => when(r.reported_at)],
    ], items, { id: "scans-table" }) : h("p", { class: "muted" }, "No scan result recorded."));
  } catch (error) {
    replace(box, errorBox(error));
  }
}

// --- one scan ------------------------------------------------------------------------------------

async function scanPage(main, session, scan, context) {
  const body = h("div", { id: "scan" });
  main.append(h("p", {}, h("a", { href: "#/scans" }, "← all scans")),
    h("h2", {}, `Scan ${scan} of session ${session}`), body);
  let shown = "";
  let busy = false;
  const url = `/api/v1/sessions/${path(session, "scans", scan)}`;
  // Until a consumer's result with its file is in, the page asks again: the scan is running.
  context.every(POLL_MS, async () => {
    if (busy || shown === "final") {
      return;
    }
    busy = true;
    try {
      await showScan();
    } catch (error) {
      replace(body, errorBox(error));
      shown = "final"; // refused (403) or broken: asking again would not change it
    } finally {
      busy = false;
    }
  });

  async function showScan() {
    try {
      const { items } = await api("GET", url);
      const key = JSON.stringify(items);
      if (key !== shown) {
        replace(body, items.map((result) => scanResult(url, result)));
        shown = items.some((r) => r.source === "consumer" && r.status !== "failed") ? "final" : key;
      }
    } catch (error) {
      if (error instanceof ApiError && error.status === 404 && shown === "waiting") {
        // Still no result: the page says so already.
      } else if (error instanceof ApiError && error.status === 404) {
        // No result yet, in a session that exists (else that session's 404 is the answer).
        await api("GET", `/api/v1/sessions/${path(session)}`);
        replace(body, h("p", { id: "scan-status", class: "status-running" },
          "In progress: no result recorded yet. This page shows it when the scan ends."));
        shown = "waiting";
      } else {
        throw error;
      }
    }
  }
}

function scanResult(url, result) {
  const lost = result.loss_manifest;
  return h("section", { class: "scan-result", "data-source": result.source },
    h("p", {}, "Status: ", h("strong", { id: result.source === "consumer" ? "scan-status" : null,
      class: `status-${result.status}` }, result.status),
    ` (${result.source}, reported ${when(result.reported_at)})`),
    result.reason ? h("div", { class: "error" }, result.reason) : null,
    table([["Counter", ([label]) => label], ["Value", ([, value]) => value]],
      COUNTS.map(([label, name]) => [label, result[name]]), { class: "scan-counts" }),
    h("dl", { class: "kv" },
      h("dt", {}, "File"), h("dd", { class: "scan-path" }, result.path),
      h("dt", {}, "SHA-256"), h("dd", { class: "scan-sha256" }, result.sha256 || "—")),
    h("h3", {}, "Lost sectors"),
    lost.length ? table([["Frame", (e) => e[0]], ["Sector", (e) => e[1]], ["Reason", (e) => e[2]]],
      lost, { class: "loss-manifest" })
      : h("p", { class: "loss-manifest muted" }, "No sector was lost."),
    result.manifest_truncated ? h("p", { class: "muted" }, "Only the first entries are listed; " +
      "the file's /metadata/stream holds them all.") : null,
    result.source === "consumer" && result.sha256 ? pictures(url) : null);
}

function pictures(url) {
  return h("div", { id: "scan-pictures", class: "row" }, PICTURES.map(([name, caption]) => {
    const source = `${url}/pictures/${name}`;
    const figure = h("figure", { class: "scan-picture" });
    const image = h("img", { src: source, alt: caption, onerror: () => explain(figure, source) });
    return replace(figure, image, h("figcaption", {}, caption));
  }));
}

// An image that would not load: the problem the API answers for it says why.
async function explain(figure, source) {
  try {
    await api("GET", source, { raw: true });
    figure.append(h("div", { class: "error" }, "The picture could not be shown."));
  } catch (error) {
    figure.append(errorBox(error));
  }
}

// --- opening a session and launching its consumer job ------------------------------------------

// The templates the caller may use (the API lists only those), fetched once per visit of the page,
// and each one's declared parameters, fetched when it is chosen.
function templateCatalogue() {
  const listed = api("GET", "/api/v1/templates").then(({ items }) => items);
  const details = new Map();
  return {
    ofKind: async (kind) => (await listed).filter((t) => t.kind === kind).map((t) => t.name),
    parameters: (name) => {
      if (!details.has(name)) {
        details.set(name, api("GET", `/api/v1/templates/${path(name)}`)
          .catch((error) => {
            details.delete(name); // asked again when chosen again
            throw error;
          }));
      }
      return details.get(name).then((template) => template.parameters);
    },
  };
}

// A <select> of the templates of one kind and, below it, the chosen one's parameter inputs. An
// option "" (when `none` names it) sends no template: the API's own choice, with its defaults.
function templateChoice(catalogue, { id, kind, prefix, preferred, none }) {
  const select = h("select", { id });
  const box = h("div", { id: `${prefix}-params`, class: "param-box" });
  const own = field("template", select);
  let shown = null; // parameterFields of the chosen template, once loaded
  const choice = {
    select, box, message: own.message,
    fields: () => [own, ...(shown ? shown.fields : [])],
    read: () => (shown ? shown.read() : { params: {}, errors: [] }),
  };
  async function showParameters() {
    const name = select.value;
    shown = null;
    if (!name) {
      replace(box, h("p", { class: "muted" }, none ? none.explained : "No template to choose."));
      return;
    }
    replace(box, h("p", { class: "muted" }, "Loading the template's parameters…"));
    try {
      const fields = parameterFields(prefix, await catalogue.parameters(name));
      if (select.value === name) { // not chosen otherwise meanwhile
        shown = fields;
        replace(box, fields.element);
      }
    } catch (error) {
      replace(box, errorBox(error));
    }
  }
  select.addEventListener("change", showParameters);
  (async () => {
    try {
      const names = await catalogue.ofKind(kind);
      replace(select, none ? h("option", { value: "" }, none.label) : null,
        names.map((name) => h("option", { value: name }, name)));
      if (!none && !names.length) {
        replace(select, h("option", { value: "" }, `(no ${kind} template your project may use)`));
      }
      select.value = names.includes(preferred) ? preferred : select.options[0].value;
      await showParameters();
    } catch (error) {
      replace(box, errorBox(error));
    }
  })();
  return choice;
}

// The Z85 public key of a pasted key or of a chosen NAME.key file (ZeroMQ's certificate format).
async function clientKey(field, file) {
  let text = field.value.trim();
  if (!text && file.files.length) {
    text = await file.files[0].text();
  }
  if (/secret-key\s*=/.test(text)) {
    throw new Error("That is a secret key file: choose the public NAME.key " +
      "(the secret one never leaves the producer's host).");
  }
  const inFile = text.match(/public-key\s*=\s*"([^"]{40})"/);
  return inFile ? inFile[1] : text;
}

// A refusal: each field error at its input, and the whole problem in the status box. The form
// keeps every value.
function refused(status, fields, error) {
  showFieldErrors(fields, error.errors || []);
  replace(status, errorBox(error));
}

function openSessionForm(catalogue, context, opened) {
  const template = templateChoice(catalogue, { id: "session-template", kind: "dsn",
    prefix: "session", preferred: "4dstem" });
  const key = h("textarea", { id: "session-client-key", rows: 2, class: "code",
    placeholder: "Z85 public key (40 characters), or choose the file below" });
  const keyFile = h("input", { id: "session-client-key-file", type: "file", accept: ".key" });
  const status = h("div", { id: "session-status", role: "status" });
  const keyField = field("client_key", key);
  const fields = () => [...template.fields(), keyField];
  // novalidate: the API checks bounds and types, and its errors name the input at fault.
  const form = h("form", { id: "open-session", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    replace(status);
    const { params, errors } = template.read();
    if (errors.length) {
      refused(status, fields(), { message: "Some parameters are not numbers.", errors });
      return;
    }
    try {
      const session = await api("POST", "/api/v1/sessions", { body: {
        project: context.session.project, template: template.select.value, params,
        client_key: await clientKey(key, keyFile),
      } });
      showFieldErrors(fields(), []);
      replace(status, openedBox(session));
      await opened(session);
    } catch (error) {
      refused(status, fields(), error);
    }
  } },
  h("h3", {}, "Open a session"),
  h("label", { for: "session-template" }, "DSN template"), template.select,
  template.message, template.box,
  h("label", { for: "session-client-key" }, "The producer's CURVE public key " +
    "(dsn producer keygen)"), key, keyField.message,
  h("label", { for: "session-client-key-file" }, "or its NAME.key file"), keyFile,
  h("button", { type: "submit" }, "Open session"));
  return h("div", { class: "panel" }, form, status);
}

function openedBox(session) {
  return h("div", { id: "session-opened", class: "ok" },
    h("p", {}, "Session opened. Stream with the producer whose key you gave, to:"),
    h("dl", { class: "kv" },
      h("dt", {}, "Session"), h("dd", { id: "opened-id" }, session.id),
      h("dt", {}, "Gateway endpoint"), h("dd", { id: "opened-endpoint" }, session.gateway.endpoint),
      h("dt", {}, "Receipts endpoint"),
      h("dd", { id: "opened-receipts" }, session.gateway.receipts_endpoint),
      h("dt", {}, "Gateway server key"),
      h("dd", { id: "opened-server-key", class: "code" }, session.gateway.server_key),
      h("dt", {}, "Expires"), h("dd", {}, when(session.expires_at))));
}

// The API's bound on ranks per job; the project's consumer quota may be lower (it names it).
const MAX_RANKS = 4096;

function launchJobForm(catalogue, jobSession, context) {
  const template = templateChoice(catalogue, { id: "job-template", kind: "job", prefix: "job",
    none: { label: "the launcher's own", explained: "The launcher's own job template, with its " +
      "defaults. Choose a template by name to set its parameters." } });
  const ranks = h("input", { id: "job-ranks", type: "number", step: 1, min: 1, max: MAX_RANKS,
    value: 1, required: true });
  const ranksField = field("ranks", ranks);
  const fields = () => [...template.fields(), ranksField];
  const status = h("div", { id: "job-status", role: "status" });
  let polling = 0;
  const form = h("form", { id: "launch-job", novalidate: true, onsubmit: async (event) => {
    event.preventDefault();
    replace(status);
    const { params, errors } = template.read();
    const count = typedValue(ranks, "int");
    if (count.error || count.value === undefined) {
      errors.push({ field: "ranks", message: count.error || `1..${MAX_RANKS}` });
    }
    if (errors.length) {
      refused(status, fields(), { message: "Some values are not numbers.", errors });
      return;
    }
    const session = jobSession.value;
    if (!session) {
      replace(status, errorBox({ message: "Open a session first: a job serves one session." }));
      return;
    }
    try {
      const job = await api("POST", `/api/v1/sessions/${path(session, "jobs")}`, { body: {
        template: template.select.value || undefined, ranks: count.value, params,
      } });
      showFieldErrors(fields(), []);
      const mine = ++polling;
      showJob(status, job);
      // Followed while the page is open, until it ends or another job is launched.
      context.every(2 * POLL_MS, async () => {
        if (mine !== polling || JOB_ENDED.includes(status.dataset.state)) {
          return;
        }
        try {
          showJob(status, await api("GET",
            `/api/v1/sessions/${path(session, "jobs", job.id)}`));
        } catch (error) {
          replace(status, errorBox(error));
          status.dataset.state = "lost";
        }
      });
    } catch (error) {
      refused(status, fields(), error);
    }
  } },
  h("h3", {}, "Launch a consumer job"),
  h("label", { for: "job-session" }, "For session"), jobSession,
  h("label", { for: "job-template" }, "Job template"), template.select, template.message,
  h("label", { for: "job-ranks" }, "Ranks (consumer endpoints) ",
    h("span", { class: "muted" }, `(1..${MAX_RANKS}, within your project's quota)`)),
  ranks, ranksField.message,
  h("div", {}, h("strong", {}, "Parameters"), template.box),
  h("button", { type: "submit" }, "Launch job"));
  return h("div", { class: "panel" }, form, status);
}

function showJob(box, job) {
  box.dataset.state = job.state;
  replace(box, h("div", { class: JOB_ENDED.includes(job.state) && job.state !== "succeeded"
    ? "error" : "ok" },
  "Job ", h("span", { id: "job-id" }, job.id), ` (${job.template} v${job.template_version}, `,
  `${job.ranks} rank${job.ranks === 1 ? "" : "s"}, ${job.launcher}): `,
  h("strong", { id: "job-state" }, job.state),
  job.exit_code !== null ? `, exit code ${job.exit_code}` : "",
  job.detail ? h("div", { class: "muted" }, job.detail) : null));
}
