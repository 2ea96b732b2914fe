// Every request the console makes: same origin, the session cookie sent by the browser (never
// read here), and the session's CSRF token on each state change.

let csrfToken = "";

export function setCsrf(token) {
  csrfToken = token;
}

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }

  // The problem's field errors: [{field, message, line?}].
  get errors() {
    return this.problem.errors || [];
  }
}

async function problemOf(response) {
  try {
    return await response.json();
  } catch {
    return { title: response.statusText };
  }
}

// method, path, and optionally {body (JSON), text (a raw body with its type), headers}.
// Resolves to the parsed JSON (or the Response for non-JSON answers when raw is set).
export async function api(method, path, options = {}) {
  const headers = { ...(options.headers || {}) };
  let body;
  if (options.body !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.body);
  } else if (options.text !== undefined) {
    headers["Content-Type"] = options.type || "text/plain";
    body = options.text;
  }
  if (!["GET", "HEAD"].includes(method)) {
    headers["X-CSRF-Token"] = csrfToken;
  }
  const response = await fetch(path, { method, headers, body, credentials: "same-origin" });
  if (!response.ok) {
    throw new ApiError(response.status, await problemOf(response));
  }
  if (options.raw) {
    return response;
  }
  if (response.status === 204) {
    return null;
  }
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// A path with each segment encoded: names come from users.
export function path(...segments) {
  return segments.map((segment) => encodeURIComponent(String(segment))).join("/");
}
