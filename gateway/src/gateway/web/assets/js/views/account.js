// Sign up, log in, forgotten and reset passwords.

import { request } from "../api.js";
import { h } from "../dom.js";
import { busy, clearErrors, field, formError, showErrors } from "../forms.js";

function page(title, ...content) {
  return h("section", { class: "narrow" }, h("h1", { tabindex: "-1" }, title), ...content);
}

export function logInView({ session, navigate, query }) {
  const next = safeNext(query.get("next"));
  const form = h(
    "form",
    { novalidate: true },
    formError(),
    field({ label: "Email", name: "email", type: "email", autocomplete: "username", required: true }),
    field({
      label: "Password",
      name: "password",
      type: "password",
      autocomplete: "current-password",
      required: true,
    }),
    h("button", { type: "submit" }, "Log in"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const { email, password } = Object.fromEntries(new FormData(form));
    await busy(form, async () => {
      try {
        await session.logIn(email, password);
        navigate(next);
      } catch (error) {
        showErrors(form, error);
      }
    });
  });
  return page(
    "Log in",
    form,
    h(
      "p",
      {},
      "New here? ",
      h("a", { href: "/signup" }, "Create an account"),
      ". ",
      h("a", { href: "/password/forgot" }, "Forgot your password?"),
    ),
  );
}

export function signUpView({ session, navigate }) {
  const form = h(
    "form",
    { novalidate: true },
    formError(),
    field({ label: "Name", name: "display_name", autocomplete: "name", required: true }),
    field({ label: "Email", name: "email", type: "email", autocomplete: "email", required: true }),
    field({
      label: "Password",
      name: "password",
      type: "password",
      autocomplete: "new-password",
      hint: "At least 8 characters, not your email.",
      required: true,
    }),
    h("button", { type: "submit" }, "Create account"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const values = Object.fromEntries(new FormData(form));
    await busy(form, async () => {
      try {
        await request("/auth/register", { method: "POST", json: values });
        await session.logIn(values.email, values.password);
        navigate("/");
      } catch (error) {
        showErrors(form, error, { 409: "email" });
      }
    });
  });
  return page(
    "Create an account",
    form,
    h("p", {}, "Already have one? ", h("a", { href: "/login" }, "Log in"), "."),
  );
}

export function forgotView() {
  const done = h("p", { role: "status", class: "success", hidden: true });
  const form = h(
    "form",
    { novalidate: true },
    formError(),
    field({ label: "Email", name: "email", type: "email", autocomplete: "email", required: true }),
    h("button", { type: "submit" }, "Email me a reset link"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const { email } = Object.fromEntries(new FormData(form));
    await busy(form, async () => {
      try {
        await request("/auth/password/forgot", { method: "POST", json: { email } });
        clearErrors(form);
        done.textContent =
          `If ${email} has an account, a link to reset its password is on its way. ` +
          "It works once, within 30 minutes.";
        done.hidden = false;
      } catch (error) {
        showErrors(form, error);
      }
    });
  });
  return page("Forgot your password?", form, done);
}

export function resetView({ query }) {
  // the token is read once and dropped from the address bar and history
  const token = query.get("token") ?? "";
  if (token) history.replaceState(null, "", "/password/reset");
  const done = h(
    "div",
    { role: "status", class: "success", hidden: true },
    "Your password is changed and every session of the account has ended. ",
    h("a", { href: "/login" }, "Log in with the new password"),
    ".",
  );
  if (!token) {
    return page(
      "Reset your password",
      h(
        "p",
        {},
        "This page needs the link from the reset email. ",
        h("a", { href: "/password/forgot" }, "Ask for a new one"),
        ".",
      ),
    );
  }
  const form = h(
    "form",
    { novalidate: true },
    formError(),
    field({
      label: "New password",
      name: "password",
      type: "password",
      autocomplete: "new-password",
      hint: "At least 8 characters, not your email.",
      required: true,
    }),
    field({
      label: "Repeat the new password",
      name: "repeat",
      type: "password",
      autocomplete: "new-password",
      required: true,
    }),
    h("button", { type: "submit" }, "Set the new password"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const { password, repeat } = Object.fromEntries(new FormData(form));
    clearErrors(form);
    if (password !== repeat) {
      const slot = form.querySelector("#field-repeat-error");
      slot.textContent = "The two passwords differ.";
      slot.hidden = false;
      form.elements.namedItem("repeat").setAttribute("aria-invalid", "true");
      form.elements.namedItem("repeat").focus();
      return;
    }
    await busy(form, async () => {
      try {
        await request("/auth/password/reset", { method: "POST", json: { token, password } });
        form.hidden = true;
        done.hidden = false;
      } catch (error) {
        if (error.status === 400) {
          error.problem.detail =
            "This reset link is invalid, expired or already used. Ask for a new one from " +
            "“Forgot your password?”.";
        }
        showErrors(form, error);
      }
    });
  });
  return page("Reset your password", form, done);
}

export function verifyView({ session, query }) {
  // as with resets, the token is read once and dropped from the address bar;
  // it is spent only by a click, never on load (mail scanners open links)
  const token = query.get("token") ?? "";
  if (token) history.replaceState(null, "", "/email/verify");
  const done = h("p", { role: "status", class: "success", hidden: true });
  const resend = resendForm();
  if (!token) {
    return page(
      "Verify your email address",
      h("p", {}, "This page needs the link from the email we sent. Ask for a new one:"),
      resend,
    );
  }
  resend.hidden = true;
  const form = h(
    "form",
    { novalidate: true },
    formError(),
    h("button", { type: "submit" }, "Confirm my email address"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    await busy(form, async () => {
      try {
        await request("/auth/email/verify", { method: "POST", json: { token } });
        form.hidden = true;
        done.textContent = "Your email address is verified.";
        done.hidden = false;
        // a signed-in page takes a token that says so at once
        if (session.signedIn) await session.refresh().catch(() => {});
      } catch (error) {
        if (error.status === 400) {
          error.problem.detail =
            "This link is invalid, expired or already used. Ask for a new one below.";
          resend.hidden = false;
        }
        showErrors(form, error);
      }
    });
  });
  return page("Verify your email address", form, done, resend);
}

function resendForm() {
  const sent = h("p", { role: "status", class: "success", hidden: true });
  const form = h(
    "form",
    { novalidate: true },
    formError(),
    field({ label: "Email", name: "email", type: "email", autocomplete: "email", required: true }),
    h("button", { type: "submit" }, "Email me a new link"),
    sent,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const { email } = Object.fromEntries(new FormData(form));
    await busy(form, async () => {
      try {
        await request("/auth/email/verify/resend", { method: "POST", json: { email } });
        clearErrors(form);
        sent.textContent = `If ${email} has an account still to verify, a new link is on its way.`;
        sent.hidden = false;
      } catch (error) {
        showErrors(form, error);
      }
    });
  });
  return form;
}

/** Only a path of this site, so a crafted `next` cannot send the user away. */
function safeNext(next) {
  return next && next.startsWith("/") && !next.startsWith("//") ? next : "/";
}
