// Calls through the gateway (same origin). Every failure is an ApiError made
// from the problem+json body (RFC 9457), or a stand-in one for network errors.

export class ApiError extends Error {
  constructor(status, problem, headers = new Headers()) {
    super(problem.detail || problem.title || `Request failed (${status})`);
    this.status = status;
    this.problem = problem;
    this.headers = headers;
  }

  /** {field: message} from a 422's `errors` (`loc` like ["body", "price"] or
   * ["query", "tag", 0]: the field is the last name after the location). */
  fieldErrors() {
    const fields = {};
    for (const error of this.problem.errors ?? []) {
      const names = (error.loc ?? []).slice(1).filter((part) => typeof part === "string");
      const field = names.at(-1) ?? "";
      const message = String(error.msg).replace(/^Value error, /, "");
      fields[field] = fields[field] ? `${fields[field]} ${message}` : message;
    }
    return fields;
  }
}

const NETWORK_PROBLEM = {
  title: "Network error",
  detail: "The server could not be reached. Check the connection and try again.",
};

/**
 * request("/catalog/products", {json: {...}, token, headers}) -> {status, headers, body}
 * `form` sends application/x-www-form-urlencoded (the OAuth2 token endpoint).
 */
export async function request(path, { method = "GET", json, form, token, headers = {} } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers } };
  if (token) init.headers.Authorization = `Bearer ${token}`;
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = new URLSearchParams(form);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, NETWORK_PROBLEM);
  }
  const text = await response.text();
  let body = null;
  if (text) {
    try {
      body = JSON.parse(text);
    } catch {
      body = { title: response.statusText, detail: text.slice(0, 200) };
    }
  }
  if (!response.ok) {
    throw new ApiError(response.status, body ?? { title: response.statusText }, response.headers);
  }
  return { status: response.status, headers: response.headers, body };
}
