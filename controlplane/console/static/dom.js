// Building the page: elements from data through textContent and attributes only, never markup
// from strings, so nothing the API returns can become script.

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) {
      continue;
    }
    if (name.startsWith("on")) {
      element.addEventListener(name.slice(2), value);
    } else if (value === true) {
      element.setAttribute(name, "");
    } else {
      element.setAttribute(name, String(value));
    }
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) {
      continue;
    }
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

// A table of rows: columns are [heading, row => cell content].
export function table(columns, rows, attributes = {}) {
  return h("table", attributes,
    h("thead", {}, h("tr", {}, columns.map(([heading]) => h("th", {}, heading)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map(([, cell]) => h("td", {}, cell(row)))))));
}

// An error as the page shows it: the problem's detail, then each field's message.
export function errorBox(error) {
  const fields = (error.errors || []).map((e) =>
    h("li", {}, e.line ? `${e.field}, line ${e.line}: ${e.message}` : `${e.field}: ${e.message}`));
  return h("div", { class: "error", role: "alert" }, String(error.message || error),
    fields.length ? h("ul", {}, fields) : null);
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

export function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = Number(n);
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}
