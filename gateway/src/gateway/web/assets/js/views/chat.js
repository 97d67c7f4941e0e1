// Chat rooms: live messages, who is here, and a visible connection state.
// The socket logic (resume, dedupe, re-send, backoff) is ChatClient's.

import { ChatClient } from "../chat-client.js";
import { fill, formatTime, h } from "../dom.js";
import { field, formError } from "../forms.js";
import { RoomPresence } from "../presence.js";

const ROOM_NAME = /^[A-Za-z0-9_-]{1,64}$/;
const HISTORY = 50;

export function roomsView({ navigate }) {
  const form = h(
    "form",
    { novalidate: true },
    formError(),
    field({
      label: "Room",
      name: "room",
      hint: "Letters, digits, - and _ (up to 64). A room exists once someone opens it.",
      value: "lobby",
      required: true,
    }),
    h("button", { type: "submit" }, "Open the room"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const room = String(new FormData(form).get("room")).trim();
    const input = form.elements.namedItem("room");
    const slot = form.querySelector("#field-room-error");
    if (!ROOM_NAME.test(room)) {
      slot.textContent = "Use 1 to 64 letters, digits, - or _.";
      slot.hidden = false;
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    navigate(`/rooms/${room}`);
  });
  return h("section", { class: "narrow" }, h("h1", { tabindex: "-1" }, "Chat"), form);
}

export function roomView({ session, params }) {
  const room = params[0];
  const connection = h("p", { class: "connection", role: "status", dataset: { state: "connecting" } }, "Connecting…");
  // focusable, so keyboard users can scroll it
  const messages = h("ol", {
    class: "messages",
    "aria-label": "Messages",
    "aria-live": "polite",
    tabindex: "0",
  });
  const outbox = h("ul", { class: "outbox", "aria-label": "Not yet delivered" });
  const people = h("ul", { class: "presence", "aria-label": "Here now" });
  const refused = h("p", { class: "form-error", role: "alert", hidden: true });
  const input = h("input", {
    id: "field-text",
    name: "text",
    autocomplete: "off",
    maxlength: "4000",
    required: true,
    "aria-describedby": "chat-refused",
  });
  refused.id = "chat-refused";
  const composer = h(
    "form",
    { class: "composer", novalidate: true },
    h("label", { for: "field-text" }, "Message"),
    input,
    h("button", { type: "submit" }, "Send"),
  );

  const shown = new Set();
  const presence = new RoomPresence();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const client = new ChatClient({
    url: `${scheme}://${location.host}/chat/ws`,
    room,
    token: (fresh) => session.token(fresh),
    ended: () => !session.signedIn,
  });
  let historyLoaded = false;

  function show(message) {
    if (shown.has(message.id)) return;
    shown.add(message.id);
    const item = h(
      "li",
      { dataset: { id: String(message.id) } },
      h("span", { class: "author" }, message.user.display_name),
      " ",
      h("time", { datetime: message.sent_at }, formatTime(message.sent_at)),
      h("p", { class: "text" }, message.text),
    );
    // in id order, whether it came live or from the history
    const later = [...messages.children].find((li) => Number(li.dataset.id) > message.id);
    messages.insertBefore(item, later ?? null);
    if (!later) item.scrollIntoView({ block: "nearest" });
  }

  function renderPresence() {
    fill(
      people,
      presence
        .people()
        .map((person) =>
          h("li", {}, person.name, person.connections > 1 ? ` (${person.connections} tabs)` : ""),
        ),
    );
  }

  async function catchUp() {
    const calls = [session.call(`/chat/rooms/${room}/presence`)];
    if (!historyLoaded) {
      const after = Math.max(0, client.lastId - HISTORY);
      calls.push(session.call(`/chat/rooms/${room}/messages?after=${after}&limit=${HISTORY}`));
    }
    const [current, history] = await Promise.allSettled(calls);
    if (current.status === "fulfilled") {
      presence.reset(current.value.body);
      renderPresence();
    }
    if (history?.status === "fulfilled") {
      historyLoaded = true;
      history.value.body.items.forEach(show);
    }
  }

  client.addEventListener("state", ({ detail }) => {
    connection.dataset.state = detail.state;
    if (detail.state === "open") {
      connection.dataset.node = client.node;
      connection.textContent = "Connected";
      catchUp();
    } else if (detail.state === "reconnecting") {
      const seconds = detail.delayMs ? ` in ${Math.max(1, Math.round(detail.delayMs / 1000))} s` : "";
      connection.textContent = `Connection lost. Reconnecting${seconds}…`;
    } else if (detail.state === "connecting") {
      connection.textContent = "Connecting…";
    } else {
      connection.textContent = "Disconnected.";
    }
  });
  client.addEventListener("message", ({ detail }) => show(detail));
  client.addEventListener("ack", ({ detail }) => {
    outbox.querySelector(`[data-client-id="${CSS.escape(detail.clientId)}"]`)?.remove();
  });
  client.addEventListener("presence", ({ detail }) => {
    // one diff per replica and interval (see presence.js)
    presence.apply(detail);
    renderPresence();
  });
  client.addEventListener("problem", ({ detail }) => {
    refused.textContent = `Not sent: ${detail.detail}`;
    refused.hidden = false;
  });

  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    refused.hidden = true;
    const clientId = client.send(text);
    outbox.append(
      h(
        "li",
        { dataset: { clientId } },
        h("span", { class: "author" }, session.user.display_name),
        " ",
        h("span", { class: "sending" }, "sending…"),
        h("p", { class: "text" }, text),
      ),
    );
    input.value = "";
  });

  const renew = ({ detail }) => client.renewToken(detail.token);
  const online = () => client.reconnectNow();
  session.addEventListener("token", renew);
  window.addEventListener("online", online);
  client.start();

  const element = h(
    "section",
    { class: "room" },
    h("div", { class: "heading" }, h("h1", { tabindex: "-1" }, `# ${room}`), connection),
    h(
      "div",
      { class: "room-body" },
      h("div", { class: "conversation" }, messages, outbox, composer, refused),
      h("aside", { "aria-labelledby": "here-now" }, h("h2", { id: "here-now" }, "Here now"), people),
    ),
  );
  return {
    element,
    dispose() {
      session.removeEventListener("token", renew);
      window.removeEventListener("online", online);
      client.close();
    },
  };
}
