// The live page: gateways, (for an admin) the registered gateways sessions are placed on, open
// sessions with their gateway, consumers (and leases) and jobs, and the scans in progress with
// their rates and backpressure, as the service sends them (GET /api/v1/live, a stream of
// server-sent snapshots every 2 s, authorized and audited once per connection).
// Rates come from two successive samples of the gateways' counters.

import { api, ApiError } from "./api.js";
import { bytes, errorBox, h, replace, table, when } from "./dom.js";

const STREAM = "/api/v1/live";

export async function render(main, args, context) {
  const status = h("div", { id: "live-status", role: "status", class: "muted" }, "Loading…");
  const gateways = h("section", { id: "live-gateways" });
  // The registry's loads count every project's sessions: the service sends it to admins only.
  const registry = context.admin ? h("section", { id: "live-registry" }) : null;
  const scans = h("section", { id: "live-scans" });
  const sessions = h("section", { id: "live-sessions" });
  const details = h("section", { id: "live-details" });
  main.append(status, ...[gateways, registry, scans, sessions, details].filter(Boolean));
  const rates = new Rates();
  // Same origin: the browser sends the sign-in cookie; a GET needs no CSRF token.
  const source = new EventSource(STREAM);
  context.onLeave(() => source.close());
  source.addEventListener("snapshot", (message) => {
    const snapshot = JSON.parse(message.data);
    rates.sample(snapshot.gateways);
    show(snapshot, rates, { gateways, registry, scans, sessions, details });
    replace(status, `Updated ${new Date().toLocaleTimeString()}, live.`);
  });
  source.addEventListener("signed-out", () => {
    source.close();
    context.refresh();  // the shell notices the sign-in has ended and says so
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      refused(status, context);
    } else {
      // The stream ended (it lasts minutes) or the connection dropped: the browser reconnects.
      replace(status, "Reconnecting…");
    }
  });
}

// The stream was refused, and EventSource does not say why: ask once for a single snapshot to
// read the problem (401: the shell shows the sign-in).
async function refused(status, context) {
  const again = h("button", { type: "button", id: "live-reconnect",
    onclick: () => context.refresh() }, "Reconnect");
  try {
    const response = await api("GET", `${STREAM}?once=true`, { raw: true });
    await response.body.cancel();
    replace(status, "The live stream was interrupted. ", again);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      context.refresh();
      return;
    }
    replace(status, errorBox(error), again);
  }
}

// Per gateway and session: the last sample of its counters, and the rates between the last two.
class Rates {
  constructor() {
    this.last = new Map();
    this.rates = new Map();
  }

  sample(gateways) {
    for (const gateway of gateways) {
      const at = Date.parse(gateway.scraped_at) / 1000;
      for (const counters of gateway.sessions) {
        const key = `${gateway.url} ${counters.session}`;
        const before = this.last.get(key);
        if (before && at > before.at) {
          const span = at - before.at;
          const per = (name) => Math.max(0, counters[name] - before.counters[name]) / span;
          this.rates.set(key, {
            bytes: per("bytes"), messages: per("messages"),
            waiting: Math.min(1, per("backpressure_seconds")),
          });
        }
        this.last.set(key, { at, counters });
      }
    }
  }

  of(gateway, session) {
    return this.rates.get(`${gateway.url} ${session}`) || null;
  }
}

function show(snapshot, rates, parts) {
  const counters = countersBySession(snapshot.gateways, rates);
  replace(parts.gateways, h("h2", {}, "Gateways"), gatewayTable(snapshot.gateways, rates));
  if (parts.registry) {
    replace(parts.registry, h("h2", {}, "Registered gateways"),
      registryTable(snapshot.registered, Date.parse(snapshot.at)));
  }
  replace(parts.scans, h("h2", {}, "Scans in progress"), scanTable(snapshot.gateways, rates));
  replace(parts.sessions, h("h2", {}, "Open sessions"),
    sessionTable(snapshot.sessions, snapshot.inspected, counters));
  replace(parts.details, snapshot.inspected.map(sessionDetail),
    snapshot.more > 0 ? h("p", { class: "muted" },
      `${snapshot.more} more open sessions are not inspected here; see the scans page.`) : null);
}

function countersBySession(gateways, rates) {
  const found = new Map();
  for (const gateway of gateways) {
    for (const counters of gateway.sessions) {
      found.set(counters.session, { counters, rate: rates.of(gateway, counters.session) });
    }
  }
  return found;
}

const mbps = (rate) => (rate ? `${(rate.bytes / 1e6).toFixed(2)} MB/s` : "…");
const msgps = (rate) => (rate ? `${rate.messages.toFixed(1)} msg/s` : "…");
const share = (rate) => (rate ? `${Math.round(rate.waiting * 100)} %` : "…");

function backpressure(counters, rate) {
  const now = counters.backpressure_waiting_seconds;
  return h("span", { class: now > 0 ? "live-waiting" : "" },
    now > 0 ? `waiting ${now.toFixed(1)} s now` : "not waiting", ", ", share(rate), " of the time");
}

function sum(values) {
  return values.reduce((total, value) => total + value, 0);
}

function drops(counters) {
  return sum(Object.values(counters.drops || {}));
}

function gatewayTable(gateways, rates) {
  if (!gateways.length) {
    return h("p", { class: "muted", id: "live-no-gateways" },
      "No gateway is configured (the control plane's gateway.metrics, --gateway-metrics).");
  }
  return table([
    ["Gateway", (g) => g.url],
    ["State", (g) => (g.up ? h("span", { class: "live-up" }, "up")
      : h("span", { class: "live-down" }, `down: ${g.reason}`))],
    ["Sessions", (g) => g.sessions.length],
    ["Open scans", (g) => sum(g.sessions.map((s) => s.scans_open))],
    ["Forwarded", (g) => {
      const known = g.sessions.map((s) => rates.of(g, s.session)).filter(Boolean);
      const bytesPerS = sum(known.map((r) => r.bytes));
      return g.up && known.length ? `${(bytesPerS / 1e6).toFixed(2)} MB/s, ` +
        `${sum(known.map((r) => r.messages)).toFixed(1)} msg/s` : "…";
    }],
    ["Spooled", (g) => bytes(sum(g.sessions.map((s) => s.spooled_bytes)))],
    ["Drops", (g) => sum(g.sessions.map(drops))],
  ], gateways, { id: "gateway-table" });
}

// Seconds as the page says them: "12 s", "5 min", "3 h".
function age(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 120) {
    return `${s} s`;
  }
  return s < 7200 ? `${Math.round(s / 60)} min` : `${Math.round(s / 3600)} h`;
}

// Ages are taken from the snapshot's own time, so the browser's clock does not matter.
function registryTable(registered, at) {
  if (!registered.length) {
    return h("p", { class: "muted", id: "live-no-registered" },
      "No gateway has registered: sessions go to the configured gateway.");
  }
  const since = (iso) => age((at - Date.parse(iso)) / 1000);
  const heartbeat = (g) => `${when(g.last_seen)} (${since(g.last_seen)} ago)`;
  const rows = table([
    ["Name", (g) => g.name],
    ["Endpoint", (g) => g.endpoint],
    ["State", (g) => (g.live ? h("span", { class: "live-up" }, "live")
      : h("span", { class: "live-silent" }, `silent since ${when(g.last_seen)}`))],
    ["Sessions placed", (g) => `${g.sessions} of ${g.capacity}`],
    ["Last heartbeat", heartbeat],
  ], registered, { id: "registry-table" });
  rows.querySelectorAll("tbody tr").forEach((row, index) => {
    row.classList.add("registry-row");
    row.dataset.gateway = registered[index].name;
  });
  return rows;
}

// The registered gateway a session is placed on (none: the configured gateway), each lane's for
// a session split over several, and the one it was moved off when that one fell silent.
function placedOn(session) {
  const name = session.lanes.length
    ? session.lanes.map((lane, index) => `${lane.name} (lane ${index})`).join(", ")
    : session.gateway_name || h("span", { class: "muted" }, "configured gateway");
  if (!session.previous_gateway) {
    return name;
  }
  return [name, h("span", { class: "live-moved", title: `moved ${when(session.replaced_at)}` },
    `, moved from ${session.previous_gateway}`)];
}

function scanTable(gateways, rates) {
  const rows = gateways.flatMap((g) => g.sessions.filter((s) => s.scans_open > 0)
    .map((s) => ({ gateway: g, counters: s, rate: rates.of(g, s.session) })));
  if (!rows.length) {
    return h("p", { class: "muted" }, "No scan is streaming.");
  }
  return table([
    ["Session", (r) => r.counters.session],
    ["Gateway", (r) => r.gateway.url],
    ["Open scans", (r) => r.counters.scans_open],
    ["Rate", (r) => `${mbps(r.rate)}, ${msgps(r.rate)}`],
    ["Consumers connected", (r) => `${r.counters.consumers_connected} of ${r.counters.consumers}`],
    ["Backpressure", (r) => backpressure(r.counters, r.rate)],
    ["Spooled", (r) => bytes(r.counters.spooled_bytes)],
    ["Drops", (r) => drops(r.counters)],
  ], rows, { id: "scan-table" });
}

function sessionTable(open, inspected, counters) {
  if (!open.length) {
    return h("p", { class: "muted", id: "live-no-sessions" }, "No session is open.");
  }
  const details = new Map(inspected.map((s) => [s.id, s]));
  const at = (s) => counters.get(s.id) || null;
  const rows = table([
    ["Session", (s) => s.id],
    ["Project", (s) => s.project],
    ["Template", (s) => `${s.template} v${s.template_version}`],
    ["Gateway", placedOn],
    ["Expires", (s) => when(s.expires_at)],
    ["Consumers", (s) => {
      const detail = details.get(s.id);
      return detail ? `${detail.counters.live_consumers} live of ${detail.counters.consumers}` : "…";
    }],
    ["Jobs", (s) => (details.has(s.id) ? details.get(s.id).jobs.length : "…")],
    ["Open scans", (s) => (at(s) ? at(s).counters.scans_open : "—")],
    ["Rate", (s) => (at(s) ? `${mbps(at(s).rate)}, ${msgps(at(s).rate)}` : "—")],
    ["Backpressure", (s) => (at(s) ? backpressure(at(s).counters, at(s).rate) : "—")],
  ], open, { id: "session-table" });
  rows.querySelectorAll("tbody tr").forEach((row, index) => {
    row.classList.add("session-row");
    row.dataset.session = open[index].id;
  });
  return rows;
}

function sessionDetail(session) {
  const now = Date.now();
  const lease = (c) => {
    const left = Math.round((Date.parse(c.lease_expires_at) - now) / 1000);
    return c.state === "live" ? `${left} s left` : c.state;
  };
  return h("article", { class: "live-session", id: `live-session-${session.id}`,
    "data-session": session.id },
  h("h3", {}, `Session ${session.id}`, h("span", { class: "muted" }, ` ${session.project}`)),
  session.consumers.length ? table([
    ["Rank", (c) => c.rank], ["Host", (c) => c.host], ["Endpoint", (c) => c.endpoint],
    ["Job", (c) => c.job_id], ["Lease", lease], ["Registered", (c) => when(c.registered_at)],
  ], session.consumers, { class: "consumer-table" })
    : h("p", { class: "muted" }, "No consumer has registered."),
  session.jobs.length ? table([
    ["Job", (j) => j.id], ["Template", (j) => `${j.template} v${j.template_version}`],
    ["Launcher", (j) => j.launcher], ["Ranks", (j) => j.ranks],
    ["State", (j) => (j.exit_code === null ? j.state : `${j.state} (exit ${j.exit_code})`)],
    ["Detail", (j) => j.detail || ""], ["Submitted", (j) => when(j.submitted_at)],
  ], session.jobs, { class: "job-table" }) : h("p", { class: "muted" }, "No consumer job."));
}
