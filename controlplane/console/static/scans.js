// The scans page.

import { h } from "./dom.js";

export async function render(main) {
  main.append(h("p", { class: "muted" }, "Not available yet."));
}
