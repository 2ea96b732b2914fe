// Typed form fields: one input per declared template parameter (GET /api/v1/templates/NAME gives
// each one's type, bounds, choices and default), read back as the JSON types the API checks
// strictly ("5" is not 5), and field errors shown at the input they name.

import { h, replace } from "./dom.js";

const NUMERIC = ["int", "port"];

function shown(value) {
  return Array.isArray(value) ? value.join(", ") : String(value);
}

function hasDefault(spec) {
  return spec.default !== undefined && spec.default !== null;
}

// What a field takes, next to its name: the type, its bounds or choices, required or not.
function hint(spec) {
  const parts = [spec.type];
  if (NUMERIC.includes(spec.type)) {
    const [lo, hi] = bounds(spec);
    parts.push(`${lo}..${hi}`);
  } else if (spec.type.endsWith("_list")) {
    parts.push("comma-separated");
  }
  if (!hasDefault(spec)) {
    parts.push("required");
  }
  return `(${parts.join(", ")})`;
}

function bounds(spec) {
  const [lo, hi] = spec.type === "port" ? [1, 65535] : [undefined, undefined];
  return [spec.min ?? lo, spec.max ?? hi];
}

// A field's message slot and the input it belongs to, under the API's field name.
export function field(name, input) {
  const message = h("span", { class: "field-error", id: `${input.id}-error` });
  input.setAttribute("aria-describedby", message.id);
  return { name, input, message };
}

function parameterInput(id, spec) {
  if (spec.type === "enum" || spec.type === "bool") {
    const choices = spec.type === "bool" ? [true, false] : spec.choices || [];
    const select = h("select", { id },
      hasDefault(spec) ? null : h("option", { value: "" }, "(choose)"),
      // Values as JSON, so a choice keeps its type (the integer 5 is not the string "5").
      choices.map((choice) => h("option", { value: JSON.stringify(choice) }, String(choice))));
    select.value = hasDefault(spec) ? JSON.stringify(spec.default) : "";
    return select;
  }
  const example = spec.example !== undefined && spec.example !== null
    ? `e.g. ${shown(spec.example)}` : null;
  const value = hasDefault(spec) ? shown(spec.default) : null;
  if (NUMERIC.includes(spec.type)) {
    const [min, max] = bounds(spec);
    return h("input", { id, type: "number", step: 1, min, max, value, placeholder: example });
  }
  return h("input", { id, type: "text", value, placeholder: example, autocomplete: "off",
    spellcheck: "false", maxlength: spec.type === "string" ? spec.max_length : null });
}

// The value to send, undefined when the field is left empty (the template's default applies, or
// the API says the parameter is required), or an error the API could not name: a number field
// the browser cannot read gives no text to send.
export function typedValue(input, type) {
  if (input.validity && input.validity.badInput) {
    return { error: "not a whole number" };
  }
  const text = input.value.trim();
  if (text === "") {
    return {};
  }
  if (input.tagName === "SELECT") {
    return { value: JSON.parse(text) };
  }
  if (NUMERIC.includes(type)) {
    return { value: /^-?\d+$/.test(text) ? Number(text) : text }; // the API names a non-integer
  }
  if (type.endsWith("_list")) {
    return { value: text.split(/[\s,]+/).filter(Boolean) };
  }
  return { value: input.value };
}

// The inputs of a template's parameters, ids `${prefix}-param-NAME`: {element, fields, read()};
// read() gives {params, errors} with errors as the API words them (field `params.NAME`).
export function parameterFields(prefix, parameters) {
  const entries = Object.entries(parameters || {});
  const fields = [];
  const rows = entries.map(([name, spec]) => {
    const input = parameterInput(`${prefix}-param-${name}`, spec);
    const slot = { ...field(`params.${name}`, input), spec };
    fields.push(slot);
    return h("div", { class: "param-field", "data-param": name },
      h("label", { for: input.id }, `${name} `, h("span", { class: "muted" }, hint(spec))),
      input, slot.message,
      spec.description ? h("small", { class: "muted" }, spec.description) : null);
  });
  const element = h("div", { id: `${prefix}-params`, class: "param-fields" },
    rows.length ? rows : h("p", { class: "muted" }, "This template takes no parameters."));
  function read() {
    const params = {};
    const errors = [];
    for (const { name, input, spec } of fields) {
      const { value, error } = typedValue(input, spec.type);
      if (error) {
        errors.push({ field: name, message: error });
      } else if (value !== undefined) {
        params[name.slice("params.".length)] = value;
      }
    }
    return { params, errors };
  }
  return { element, fields, read };
}

// Each error at the field it names (the others stay for the summary); clears earlier marks.
export function showFieldErrors(fields, errors) {
  for (const { input, message } of fields) {
    input.classList.remove("invalid");
    input.removeAttribute("aria-invalid");
    replace(message);
  }
  for (const error of errors) {
    const found = fields.find((f) => f.name === error.field);
    if (found) {
      found.input.classList.add("invalid");
      found.input.setAttribute("aria-invalid", "true");
      found.message.append(found.message.textContent ? `; ${error.message}` : error.message);
    }
  }
}
