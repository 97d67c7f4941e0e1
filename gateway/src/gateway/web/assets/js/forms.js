// Form fields with a place for their error, and problem+json errors put next
// to the field they name.

import { ApiError } from "./api.js";
import { h } from "./dom.js";

/** A labelled input and its (hidden until needed) error message. */
export function field({ label, name, type = "text", hint, ...attributes }) {
  const id = `field-${name}`;
  const input = h(type === "textarea" ? "textarea" : "input", {
    id,
    name,
    type: type === "textarea" ? null : type,
    "aria-describedby": `${id}-error${hint ? ` ${id}-hint` : ""}`,
    ...attributes,
  });
  return h(
    "div",
    { class: "field" },
    h("label", { for: id }, label),
    input,
    hint ? h("p", { class: "hint", id: `${id}-hint` }, hint) : null,
    h("p", { class: "field-error", id: `${id}-error`, hidden: true }),
  );
}

export function formError() {
  return h("div", { class: "form-error", role: "alert", hidden: true });
}

export function clearErrors(form) {
  for (const message of form.querySelectorAll(".field-error, .form-error")) {
    message.hidden = true;
    message.textContent = "";
  }
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

const FRIENDLY = {
  0: null,
  401: null,
  403: "You are not allowed to do this.",
  404: "It does not exist (any more).",
  429: "Too many attempts. Wait a moment and try again.",
  502: "The service did not answer. Try again in a moment.",
  503: "The service is busy or restarting. Try again in a moment.",
  504: "The service took too long to answer. Try again.",
};

/**
 * Shows an error on the form: each field named by a 422's `errors` gets its
 * message; `fieldFor` maps other problems to a field ({409: "email"}); the
 * rest goes in the form's alert. The first field in error takes the focus.
 */
export function showErrors(form, error, fieldFor = {}) {
  clearErrors(form);
  if (!(error instanceof ApiError)) {
    console.error(error);
    error = new ApiError(0, { title: "Something went wrong", detail: String(error) });
  }
  const fields = error.fieldErrors();
  const mapped = fieldFor[error.status];
  if (mapped && Object.keys(fields).length === 0) fields[mapped] = error.problem.detail;
  let first = null;
  const leftover = [];
  for (const [name, message] of Object.entries(fields)) {
    const input = name ? form.elements.namedItem(name) : null;
    const slot = input && form.querySelector(`#field-${CSS.escape(name)}-error`);
    if (!slot) {
      leftover.push(name ? `${name}: ${message}` : message);
      continue;
    }
    slot.textContent = message;
    slot.hidden = false;
    input.setAttribute("aria-invalid", "true");
    first ??= input;
  }
  if (leftover.length > 0 || Object.keys(fields).length === 0) {
    const alert = form.querySelector(".form-error");
    const retry = error.headers.get("Retry-After");
    const general = FRIENDLY[error.status] ?? null;
    const text =
      leftover.join(" ") ||
      [error.problem.detail || error.problem.title || general, retry ? `(retry in ${retry} s)` : ""]
        .filter(Boolean)
        .join(" ");
    alert.textContent = text || general || error.message;
    alert.hidden = false;
  }
  first?.focus();
}

/** Disables the form's buttons while `task` runs. */
export async function busy(form, task) {
  const buttons = [...form.querySelectorAll("button")];
  for (const button of buttons) button.disabled = true;
  form.setAttribute("aria-busy", "true");
  try {
    return await task();
  } finally {
    for (const button of buttons) button.disabled = false;
    form.removeAttribute("aria-busy");
  }
}
