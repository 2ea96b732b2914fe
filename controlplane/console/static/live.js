// The live page: gateways, open sessions with their consumers (and leases) and jobs, and the scans
// in progress with their rates and backpressure, polled every 2 s without reloading the page.
// Rates come from two successive samples of the gateways' counters (GET /api/v1/gateways).

import { api, ApiError, path } from "./api.js";
import { bytes, errorBox, h, replace, table, when } from "./dom.js";

const POLL_MS = 2000;
// Every request is rate-limited and audited: the sessions and the gateways' counters are asked
// for at every poll, each session's consumers and jobs only every DETAIL_EVERY polls (or when the
// open sessions change), and for at most MAX_DETAILED sessions.
const DETAIL_EVERY = 5;
const MAX_DETAILED = 8;

export async function render(main, args, context) {
  const status = h("div", { id: "live-status", role: "status", class: "muted" }, "Loading…");
  const gateways = h("section", { id: "live-gateways" });
  const scans = h("section", { id: "live-scans" });
  const sessions = h("section", { id: "live-sessions" });
  const details = h("section", { id: "live-details" });
  main.append(status, gateways, scans, sessions, details);
  const rates = new Rates();
  const inspector = new Inspector();
  let busy = false;
  context.every(POLL_MS, async () => {
    if (busy) {
      return;  // the previous poll is still waiting for an answer
    }
    busy = true;
    try {
      const snapshot = await poll(inspector);
      rates.sample(snapshot.gateways);
      show(snapshot, rates, { gateways, scans, sessions, details });
      replace(status, `Updated ${new Date().toLocaleTimeString()}, every ${POLL_MS / 1000} s.`);
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        context.refresh();  // the shell notices the sign-in has ended and says so
        return;
      }
      replace(status, errorBox(error));
    } finally {
      busy = false;
    }
  });
}

async function poll(inspector) {
  const [listed, gateways] = await Promise.all([
    api("GET", "/api/v1/sessions"), api("GET", "/api/v1/gateways")]);
  const open = listed.items.filter((s) => s.state === "open")
    .sort((a, b) => b.created_at.localeCompare(a.created_at));
  const inspected = await inspector.inspect(open.slice(0, MAX_DETAILED));
  return { open, inspected, gateways: gateways.items, more: open.length - inspected.length };
}

// Each open session's detail (consumers with their leases, counters) and jobs, asked for again
// every DETAIL_EVERY polls, or at once when the sessions inspected change.
class Inspector {
  constructor() {
    this.polls = 0;
    this.ids = "";
    this.last = [];
  }

  async inspect(sessions) {
    const ids = sessions.map((s) => s.id).join(" ");
    this.polls += 1;
    if (ids === this.ids && this.polls < DETAIL_EVERY) {
      return this.last;
    }
    this.last = await Promise.all(sessions.map(async (session) => {
      const id = path(session.id);
      const [detail, jobs] = await Promise.all([
        api("GET", `/api/v1/sessions/${id}`), api("GET", `/api/v1/sessions/${id}/jobs`)]);
      return { ...detail, jobs: jobs.items };
    }));
    this.ids = ids;
    this.polls = 0;
    return this.last;
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
  replace(parts.scans, h("h2", {}, "Scans in progress"), scanTable(snapshot.gateways, rates));
  replace(parts.sessions, h("h2", {}, "Open sessions"),
    sessionTable(snapshot.open, snapshot.inspected, counters));
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
