// The policies page (admins): the active policy set, a check of a policy file before it is put
// in place (nothing is activated here: a reload of the configured file does that), and the
// active set's decision on a sample request.

import { api } from "./api.js";
import { errorBox, h, replace, table } from "./dom.js";

const MAX_UPLOAD = 256 * 1024;

function list(values) {
  return (values || []).join(", ");
}

function section(title, ...content) {
  return [h("h2", {}, title), ...content];
}

function activeSet(summary) {
  const policy = summary.policy;
  const rules = table([
    ["Id", (r) => h("code", {}, r.id)],
    ["Effect", (r) => h("span", { class: `effect-${r.effect}` }, r.effect)],
    ["Principals", (r) => list(r.principals)],
    ["Actions", (r) => list(r.actions)],
    ["Projects", (r) => (r.projects ? list(r.projects) : "any")],
    ["Description", (r) => r.description || ""],
  ], policy.rules, { id: "policy-rules" });
  const roles = table([
    ["Role", ([name]) => h("code", {}, name)],
    ["Scopes", ([, scopes]) => list(scopes)],
  ], Object.entries(policy.roles), { id: "policy-roles" });
  const tokens = table([
    ["Token kind", ([kind]) => kind],
    ["Longest lifetime", ([, spec]) => duration(spec.max_ttl)],
    ["Roles", ([, spec]) => list(spec.roles)],
  ], Object.entries(policy.tokens), { id: "policy-tokens" });
  const limits = table([
    ["Limit", ([name]) => name.replaceAll("_", " ")],
    ["Rate", ([, rate]) => h("code", {}, rate)],
  ], Object.entries(policy.rate_limits), { id: "policy-rate-limits" });
  const quotas = table([
    ["Projects", ([name]) => name],
    ["Tokens", ([, q]) => q.tokens ?? "default"],
    ["Sessions", ([, q]) => q.sessions ?? "default"],
    ["Consumers", ([, q]) => q.consumers ?? "default"],
  ], [["every project (defaults)", policy.quotas.defaults], ...Object.entries(policy.quotas.projects)]);
  const templates = table([
    ["Projects", ([name]) => name],
    ["Templates they may use", ([, patterns]) => list(patterns)],
  ], [["every project (defaults)", policy.templates.defaults],
    ...Object.entries(policy.templates.projects)]);
  const gateways = table([
    ["Projects", ([name]) => name],
    ["Gateways their sessions may be placed on", ([, patterns]) => list(patterns) || "none"],
  ], [["every project (defaults)", policy.gateways.defaults],
    ...Object.entries(policy.gateways.projects)], { id: "policy-gateways" });
  const networks = table([
    ["Networks", ([name]) => name],
    ["Allowed", ([, values]) => list(values) || "none"],
  ], [["producer sources", policy.networks.sources], ["consumer targets", policy.networks.targets],
    ["consumer host names", policy.networks.target_hosts]]);
  return [
    h("p", { id: "policy-version" }, "Digest ", h("code", { id: "policy-digest" }, summary.digest),
      " · from ", list(summary.sources),
      policy.allow_plaintext ? " · plaintext tokens allowed at the gateway" : ""),
    h("p", { class: "muted" }, "Rules: a matching deny wins over any allow; nothing allowing an " +
      "action means default-deny. Project-bound tokens never reach another project."),
    h("h3", {}, "Rules"), rules,
    h("h3", {}, "Roles"), roles,
    h("h3", {}, "Token kinds"), tokens,
    h("h3", {}, "Rate limits"), limits,
    h("h3", {}, "Quotas"), quotas,
    h("h3", {}, "Templates"), templates,
    h("h3", {}, "Gateways"), gateways,
    h("h3", {}, "Networks"), networks,
    policy.federation ? h("p", {}, `Federated sign-in: ${policy.federation.issuers.length} ` +
      "trusted issuer(s), see the JSON below.") : null,
    h("details", {}, h("summary", {}, "The whole set as JSON"),
      h("pre", {}, JSON.stringify(policy, null, 2))),
  ];
}

function duration(seconds) {
  const units = [["w", 604800], ["d", 86400], ["h", 3600], ["m", 60]];
  const found = units.find(([, size]) => seconds % size === 0);
  return found ? `${seconds / found[1]}${found[0]}` : `${seconds}s`;
}

function checkResult(answer) {
  if (answer.valid) {
    return h("div", { class: "ok", role: "status" }, answer.summary, " · digest ",
      h("code", {}, answer.digest),
      h("p", { class: "muted" }, "Nothing was activated: put the file in place and reload."));
  }
  return h("div", { class: "error", role: "alert" }, answer.summary,
    h("ul", { class: "policy-problems" }, answer.errors.map((e) =>
      h("li", {}, h("span", { class: "line" }, e.line ? `line ${e.line}` : "—"), " ",
        h("code", {}, e.field), ": ", e.message))));
}

function checkForm() {
  const file = h("input", { id: "policy-file", type: "file", accept: ".yaml,.yml,text/yaml" });
  const text = h("textarea", { id: "policy-text", class: "code", rows: 14, spellcheck: "false",
    placeholder: "version: 1\nroles: …" });
  const result = h("div", { id: "policy-check-result" });
  file.addEventListener("change", async () => {
    const chosen = file.files[0];
    if (!chosen) {
      return;
    }
    if (chosen.size > MAX_UPLOAD) {
      replace(result, h("div", { class: "error", role: "alert" },
        `${chosen.name} is ${chosen.size} bytes; a policy file may have at most ${MAX_UPLOAD}.`));
      return;
    }
    text.value = await chosen.text();
    replace(result);
  });
  const form = h("form", { id: "policy-check", onsubmit: async (event) => {
    event.preventDefault();
    const chosen = file.files[0] ? file.files[0].name : "pasted.yaml";
    // How messages name the text: the file's name where the API accepts it as one.
    const name = /^[A-Za-z0-9][A-Za-z0-9_. -]{0,99}$/.test(chosen) ? chosen : "upload.yaml";
    replace(result, h("p", { class: "muted" }, "Checking…"));
    try {
      replace(result, checkResult(await api("POST", "/api/v1/policies/validate",
        { body: { text: text.value, name } })));
    } catch (error) {
      replace(result, errorBox(error));
    }
  } },
  h("label", { for: "policy-file" }, "A policy file"), file,
  h("label", { for: "policy-text" }, "or its text (choosing a file puts it here)"), text,
  h("button", { type: "submit" }, "Check"));
  return [h("p", { class: "muted" }, "The same checks as `dsn admin policies check` and a " +
    "reload; nothing is activated."), form, result];
}

function select(id, values, chosen) {
  return h("select", { id }, values.map((value) =>
    h("option", { value, selected: value === chosen }, value)));
}

// The resource kind an action most likely acts on, from its area ("sessions:read" -> session).
function resourceFor(action, kinds) {
  const area = action.split(":")[0];
  const guess = [area, area.replace(/s$/, ""), { consumers: "session", jwks: "key" }[area]];
  return guess.find((kind) => kinds.includes(kind)) || kinds[0];
}

function field(label, control) {
  return h("label", { class: "field" }, h("span", {}, label), control);
}

function decideForm(catalogue) {
  const kind = select("decide-kind", catalogue.principals, "project");
  const subject = h("input", { id: "decide-subject", value: "sample", maxlength: 200 });
  const project = h("input", { id: "decide-project", placeholder: "none", maxlength: 63 });
  const scopes = h("input", { id: "decide-scopes", placeholder: "as the policy grants the kind",
    size: 40 });
  const action = select("decide-action", catalogue.actions, "sessions:read");
  const resourceKind = select("decide-resource-kind", catalogue.resources,
    resourceFor("sessions:read", catalogue.resources));
  const resourceProject = h("input", { id: "decide-resource-project", placeholder: "none",
    maxlength: 63 });
  const resourceName = h("input", { id: "decide-resource-name", placeholder: "none",
    maxlength: 200 });
  action.addEventListener("change", () => {
    resourceKind.value = resourceFor(action.value, catalogue.resources);
  });
  const result = h("div", { id: "decision" });
  const optional = (input) => input.value.trim() || null;
  const form = h("form", { id: "policy-decide", onsubmit: async (event) => {
    event.preventDefault();
    const words = scopes.value.trim().split(/\s+/).filter(Boolean);
    const body = {
      principal: { kind: kind.value, subject: subject.value.trim() || "sample",
        project: optional(project), scopes: words.length ? words : null },
      action: action.value,
      resource: { kind: resourceKind.value, project: optional(resourceProject),
        name: optional(resourceName) },
    };
    try {
      const answer = await api("POST", "/api/v1/policies/decide", { body });
      replace(result, h("div", { class: answer.allowed ? "ok" : "error", role: "status" },
        h("strong", { class: "verdict" }, answer.allowed ? "Allowed" : "Denied"), " by rule ",
        h("code", { class: "rule" }, answer.rule), h("p", {}, answer.reason)));
    } catch (error) {
      replace(result, errorBox(error));
    }
  } },
  h("fieldset", {}, h("legend", {}, "Who asks"), field("Token kind", kind),
    field("Subject", subject), field("Project", project),
    field("Scopes (space-separated)", scopes)),
  h("fieldset", {}, h("legend", {}, "What for"), field("Action", action),
    field("Resource kind", resourceKind), field("Resource project", resourceProject),
    field("Resource name", resourceName)),
  h("button", { type: "submit" }, "Decide"));
  return [h("p", { class: "muted" }, "What the active set answers a request; nothing is done."),
    form, result];
}

// The catalogue of kinds and actions, as the API's own document declares the decide route's input.
async function catalogue() {
  const doc = await api("GET", "/openapi.json");
  const schemas = doc.components.schemas;
  return {
    principals: schemas.SamplePrincipal.properties.kind.enum,
    actions: schemas.SampleRequest.properties.action.enum,
    resources: schemas.SampleResource.properties.kind.enum,
  };
}

// Reloading makes the service read its configured policy file again (as `dsn admin policies
// reload`); an invalid file is refused and the active set stays.
function reloadControl(active) {
  const status = h("div", { id: "policy-reload-status" });
  const button = h("button", { id: "policy-reload", type: "button", class: "secondary",
    onclick: async () => {
      try {
        const answer = await api("POST", "/api/v1/policies/reload");
        if (answer.ok) {
          replace(active, ...activeSet(await api("GET", "/api/v1/policies")));
          replace(status, h("div", { class: "ok", role: "status" },
            `Reloaded from ${list(answer.sources)}.`));
        } else {
          replace(status, h("div", { class: "error", role: "alert" },
            "Reload refused; the active set stays.",
            h("ul", {}, answer.problems.map((problem) => h("li", {}, problem)))));
        }
      } catch (error) {
        replace(status, errorBox(error));
      }
    } }, "Reload the configured file");
  return [h("p", {}, button), status];
}

export async function render(main) {
  const [summary, known] = await Promise.all([api("GET", "/api/v1/policies"), catalogue()]);
  const active = h("div", { id: "policy-active" }, ...activeSet(summary));
  main.append(
    ...section("Active policy set", ...reloadControl(active), active),
    ...section("Check a policy file", ...checkForm()),
    ...section("Try a decision", ...decideForm(known)),
  );
}
