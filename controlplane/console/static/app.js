// The console's shell: sign-in, navigation and the router. Each page is a module beside this one,
// exporting render(main, args, context); the address's hash names it: #/templates/NAME.

import { api, ApiError, setCsrf } from "./api.js";
import { errorBox, h, replace } from "./dom.js";
import * as audit from "./audit.js";
import * as live from "./live.js";
import * as policies from "./policies.js";
import * as projects from "./projects.js";
import * as scans from "./scans.js";
import * as templates from "./templates.js";

// [hash, label, module, for admins only]
const PAGES = [
  ["live", "Live", live, false],
  ["scans", "Scans", scans, false],
  ["templates", "Templates", templates, false],
  ["projects", "Projects", projects, false],
  ["policies", "Policies", policies, true],
  ["audit", "Audit", audit, true],
];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
let session = null;
let timers = [];
let leaving = [];

// Leaving a page: its polls stop and its onLeave hooks run (closing what it holds open).
function leavePage() {
  timers.forEach(clearInterval);
  timers = [];
  const hooks = leaving;
  leaving = [];
  hooks.forEach((fn) => fn());
}

function pagesFor(current) {
  return PAGES.filter(([, , , adminOnly]) => !adminOnly || current.kind === "admin");
}

function context() {
  return {
    session,
    admin: session.kind === "admin",
    navigate: (hash) => { location.hash = hash; },
    // Runs fn now and every ms until the page is left.
    every: (ms, fn) => { fn(); timers.push(setInterval(fn, ms)); },
    // Runs fn when the page is left (another page, a re-render, or signing out).
    onLeave: (fn) => { leaving.push(fn); },
    refresh: () => route(),
  };
}

async function route() {
  leavePage();
  if (!session) {
    return;
  }
  const [name, ...args] = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const pages = pagesFor(session);
  const found = pages.find(([hash]) => hash === name) || pages[0];
  for (const link of nav.querySelectorAll("a")) {
    link.classList.toggle("current", link.dataset.page === found[0]);
  }
  replace(main, h("h1", {}, found[1]));
  try {
    // Each page starts by asking whether the sign-in still holds: a revoked token shows at once.
    session = await api("GET", "/ui/session");
    setCsrf(session.csrf_token);  // another tab may have signed in anew since
    await found[2].render(main, name === found[0] ? args : [], context());
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      signedOut(`Signed out: ${error.message}.`);
      return;
    }
    main.append(errorBox(error));
  }
}

function showNav() {
  replace(nav, pagesFor(session).map(([hash, label]) =>
    h("a", { href: `#/${hash}`, "data-page": hash }, label)));
  nav.hidden = false;
  const project = session.project ? ` @ ${session.project}` : "";
  replace(who, h("span", { id: "principal" }, `${session.kind} ${session.subject}${project}`), " ",
    h("button", { id: "sign-out", type: "button", onclick: signOut }, "Sign out"));
}

async function signOut() {
  try {
    await api("DELETE", "/ui/session");
  } finally {
    signedOut("Signed out.");
  }
}

function signedOut(message) {
  leavePage();
  session = null;
  setCsrf("");
  nav.hidden = true;
  replace(who);
  showSignIn(message);
}

function showSignIn(message) {
  const field = h("textarea", { id: "token", rows: 3, autocomplete: "off", spellcheck: "false",
    placeholder: "eyJ…" });
  const file = h("input", { id: "token-file", type: "file" });
  const status = h("div", { id: "sign-in-status", role: "status" }, message || "");
  const form = h("form", { id: "sign-in", onsubmit: (event) => {
    event.preventDefault();
    signIn(field, file, status);
  } },
  h("label", { for: "token" }, "Admin or project token"), field,
  h("label", { for: "token-file" }, "or its file (dsn admin tokens issue --out …)"), file,
  h("button", { type: "submit" }, "Sign in"));
  replace(main, h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "The token is sent once; the console keeps only a session cookie " +
      "that scripts cannot read."), form, status);
}

async function signIn(field, file, status) {
  let token = field.value.trim();
  if (!token && file.files.length) {
    token = (await file.files[0].text()).trim();
  }
  field.value = "";
  file.value = "";
  if (!token) {
    replace(status, "Paste a token or choose its file.");
    return;
  }
  try {
    const response = await fetch("/ui/session", {
      method: "POST", credentials: "same-origin", headers: { Authorization: `Bearer ${token}` },
    });
    token = "";
    if (!response.ok) {
      const problem = await response.json();
      replace(status, errorBox(new ApiError(response.status, problem)));
      return;
    }
    await started(await response.json());
  } catch (error) {
    replace(status, errorBox(error));
  }
}

async function started(current) {
  session = current;
  setCsrf(current.csrf_token);
  showNav();
  await route();
}

async function boot() {
  try {
    await started(await api("GET", "/ui/session"));
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      showSignIn("");
    } else {
      replace(main, errorBox(error));
    }
  }
}

window.addEventListener("hashchange", route);
boot();
