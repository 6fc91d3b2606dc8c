// The switchboard demo page (served at /demo): connect as a user, chat with another tab,
// subscribe and publish to channels. It uses the browser client the gateway serves at
// /demo/switchboard.js (clients/js/switchboard.js in the repository).
//
// Stable test ids (data-testid), used by tests/browser/demo.test.mjs:
//
//   app-select          <select> of the apps that hand out development tokens (/demo/config.json)
//   uid-input           the user id to connect as
//   quick-uid-alice     quick buttons that fill in a user id (and the other one as "to");
//   quick-uid-bob       also -carol
//   connect-button      connect (again) as the user id in uid-input, with a fresh client
//   disconnect-button   close the connection
//   state               the client state, exactly one of idle|routing|connecting|connected|
//                       reconnecting|closed (also in its data-state attribute)
//   state-detail        more about the state (attempt, delay, reason), for people
//   state-history       <ol>, one <li data-state="..."> per state change, oldest first
//   address             the WebSocket address chosen (from /route or a reconnect frame),
//                       e.g. ws://127.0.0.1:5200 or wss://...; empty before the first choice
//   address-source      where that address came from: "(from /route)" or "(from reconnect)"
//   node                node id and connection id of the live connection
//   last-error          the last error: "code: message" (its data-code attribute: the code)
//   to-input            the recipient's user id
//   message-input       the text to send (sent as data: {"text": "..."})
//   send-button         send (enabled while connected)
//   message-log         <ol> of messages, oldest first; children:
//     received-message    <li> a message received (data-from, data-msg-id, data-channel on
//                         channel messages); its text is in a child .text
//     sent-message        <li> a message sent (data-to, data-status = pending | delivered |
//                         offline | dropped | unavailable | error, data-code on errors,
//                         data-msg-id once acknowledged)
//       delivery            inside sent-message: "delivered to 1 connection", "offline",
//                           "error: rate_limited", ...
//   channel-input       channel name; subscribe-button, unsubscribe-button
//   channel-list        <ul> of subscribed channels (one <li data-channel> each)
//   publish-input       text to publish to the channel; publish-button
//
// <body data-ready="true"> once /demo/config.json has been read and the form can be used.
// Query parameters fill the form: ?app=demo&uid=alice&to=bob&autoconnect=1

import { SwitchboardClient } from "./switchboard.js";

const $ = (id) => document.getElementById(id);
const el = {
  connectForm: $("connect-form"),
  app: $("app"),
  uid: $("uid"),
  disconnect: $("disconnect"),
  state: $("state"),
  stateDetail: $("state-detail"),
  address: $("address"),
  addressSource: $("address-source"),
  node: $("node"),
  lastError: $("last-error"),
  history: $("state-history"),
  log: $("message-log"),
  logEmpty: $("log-empty"),
  sendForm: $("send-form"),
  to: $("to"),
  text: $("text"),
  send: $("send"),
  channelForm: $("channel-form"),
  channel: $("channel"),
  subscribe: $("subscribe"),
  unsubscribe: $("unsubscribe"),
  channelList: $("channel-list"),
  publishForm: $("publish-form"),
  publishText: $("publish-text"),
  publish: $("publish"),
};

/** The gateway's base URL: where this script came from, without /demo/demo.js. */
const SERVER = new URL("..", import.meta.url).href.replace(/\/$/, "");
const PARTNER = { alice: "bob", bob: "alice", carol: "alice" };
const MAX_LOG = 500;
const MAX_HISTORY = 200;

/** @type {SwitchboardClient | null} */
let client = null;
/** Detaches the current client's listeners. */
let detach = () => {};

// ------------------------------------------------------------------------------------------
// Development tokens

/** Asks the gateway for a development token; called by the client on every (re)connect. */
async function devToken(appId, uid) {
  const response = await fetch(`${SERVER}/api/v1/dev/token`, {
    method: "POST",
    headers: { "content-type": "application/json", accept: "application/json" },
    body: JSON.stringify({ app_id: appId, uid }),
    cache: "no-store",
  });
  const body = await response.json().catch(() => null);
  if (!response.ok || !body || typeof body.token !== "string") {
    const err = new Error(
      (body && body.error && body.error.message) || `POST /api/v1/dev/token: HTTP ${response.status}`,
    );
    err.code = (body && body.error && body.error.code) || "token_failed";
    // 4xx (unknown app, dev tokens off, bad uid) will not get better by asking again: the
    // client stops. Anything else (the gateway restarting, ...) is retried.
    err.fatal = response.status >= 400 && response.status < 500;
    throw err;
  }
  return body;
}

// ------------------------------------------------------------------------------------------
// Rendering

function time(ms = Date.now()) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function textOf(data) {
  if (data && typeof data === "object" && typeof data.text === "string") return data.text;
  return JSON.stringify(data);
}

function node(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function addToLog(item) {
  el.log.append(item);
  while (el.log.children.length > MAX_LOG) el.log.firstElementChild.remove();
  el.logEmpty.hidden = true;
  el.log.scrollTop = el.log.scrollHeight;
}

function addHistory(state, text) {
  const item = node(
    "li",
    { "data-state": state },
    node("time", { text: time() }),
    node("span", { class: `badge small state-${state}`, text: state }),
    text ? node("span", { class: "muted", text }) : null,
  );
  el.history.append(item);
  while (el.history.children.length > MAX_HISTORY) el.history.firstElementChild.remove();
  el.history.scrollTop = el.history.scrollHeight;
}

function note(text) {
  // A history line that is not a state change.
  const item = node("li", { "data-note": "" }, node("time", { text: time() }), node("span", { class: "muted", text }));
  el.history.append(item);
  el.history.scrollTop = el.history.scrollHeight;
}

function showError(code, message) {
  el.lastError.dataset.code = code;
  el.lastError.textContent = message ? `${code}: ${message}` : code;
}

function clearError() {
  delete el.lastError.dataset.code;
  el.lastError.textContent = "";
}

function showState(state, detail = "") {
  el.state.textContent = state;
  el.state.dataset.state = state;
  el.state.className = `badge state-${state}`;
  el.stateDetail.textContent = detail;
  const live = state === "connected";
  el.send.disabled = !live;
  el.subscribe.disabled = !live;
  el.unsubscribe.disabled = !client || state === "idle";
  el.publish.disabled = !live;
  el.disconnect.disabled = !client || state === "closed" || state === "idle";
}

function describeState(d) {
  switch (d.state) {
    case "routing":
      return `asking /route (attempt ${d.attempt})`;
    case "connecting":
      return `to ${d.address}${d.source === "reconnect" ? " (as the server said)" : ""}`;
    case "connected":
      return `as ${d.uid}, node ${d.nodeId}, ping every ${Math.round(d.pingIntervalMs / 1000)} s`;
    case "reconnecting":
      return `in ${(d.delayMs / 1000).toFixed(1)} s, after ${d.reason ? d.reason.code : "a failure"}`;
    case "closed":
      return d.reason ? d.reason.code : "";
    default:
      return "";
  }
}

function renderChannels() {
  el.channelList.replaceChildren(
    ...(client ? client.channels : []).map((c) => node("li", { "data-channel": c }, node("code", { text: c }))),
  );
}

function showReceived(m) {
  const from = m.from === "" ? "the app server" : client && m.from === client.connection?.uid ? "you" : m.from;
  const where = m.channel ? `#${m.channel}` : "you";
  addToLog(
    node(
      "li",
      {
        class: "msg in",
        "data-testid": "received-message",
        "data-from": m.from,
        "data-msg-id": m.msg_id,
        "data-channel": m.channel,
      },
      node("div", { class: "meta" }, node("b", { text: from }), ` → ${where} · ${time(m.send_at)}`),
      node("div", { class: "text", text: textOf(m.data) }),
    ),
  );
}

function showSent(to, text, where = to) {
  const delivery = node("span", { class: "delivery", "data-testid": "delivery", text: "sending…" });
  const item = node(
    "li",
    { class: "msg out", "data-testid": "sent-message", "data-to": to, "data-status": "pending" },
    node("div", { class: "meta" }, `you → `, node("b", { text: where }), ` · ${time()} · `, delivery),
    node("div", { class: "text", text }),
  );
  addToLog(item);
  return {
    acked(ack) {
      item.dataset.status = ack.status;
      item.dataset.msgId = ack.msg_id;
      const n = ack.delivered;
      delivery.textContent =
        ack.status === "delivered"
          ? `delivered to ${n} connection${n === 1 ? "" : "s"}`
          : ack.status === "dropped"
            ? `dropped (${n} slow connection${n === 1 ? "" : "s"})`
            : ack.status;
      delivery.className = `delivery ${ack.status === "delivered" ? "ok" : "warn"}`;
    },
    failed(err) {
      item.dataset.status = "error";
      item.dataset.code = err.code || "error";
      delivery.textContent = `error: ${err.code || err.message}`;
      delivery.title = err.message;
      delivery.className = "delivery bad";
    },
  };
}

// ------------------------------------------------------------------------------------------
// The client

function start() {
  const appId = el.app.value;
  const uid = el.uid.value.trim();
  if (!appId || !uid) return;
  stop();
  clearError();
  el.history.replaceChildren();
  el.address.textContent = "";
  el.addressSource.textContent = "";
  el.node.textContent = "";
  if (!el.to.value && PARTNER[uid]) el.to.value = PARTNER[uid];
  const url = new URL(location.href);
  url.searchParams.set("app", appId);
  url.searchParams.set("uid", uid);
  history.replaceState(null, "", url);
  document.title = `${uid} · switchboard demo`;

  const c = new SwitchboardClient({
    server: SERVER,
    appId,
    uid,
    // A function, so that every reconnect gets a fresh token.
    token: async () => {
      const t = await devToken(appId, uid);
      note(`got a development token for ${t.uid}, valid until ${time(t.expires_at * 1000)}`);
      return t.token;
    },
    backoff: { initialDelayMs: 500, maxDelayMs: 5000, jitter: 1 },
  });
  client = c;
  const offs = [
    c.on("state", (d) => {
      addHistory(d.state, describeState(d));
      if (d.state === "connecting") {
        el.address.textContent = d.address;
        el.addressSource.textContent = d.source === "reconnect" ? "(from reconnect)" : "(from /route)";
      }
      if (d.state === "routing" || d.state === "closed") el.node.textContent = "";
      if (d.state === "connected") el.node.textContent = `${d.nodeId} · connection ${d.connId}`;
      showState(d.state, describeState(d));
      renderChannels();
    }),
    c.on("message", showReceived),
    c.on("error", (d) => showError(d.code, d.message)),
  ];
  detach = () => offs.forEach((off) => off());
  showState(c.state);
  c.connect().catch(() => {
    /* shown through the state and error events */
  });
}

function stop() {
  if (!client) return;
  const c = client;
  c.close();
  detach();
  client = null;
  detach = () => {};
  showState(c.state, "closed by you");
}

// ------------------------------------------------------------------------------------------
// Wiring

async function loadApps() {
  const params = new URLSearchParams(location.search);
  let apps = [];
  try {
    const response = await fetch(`${SERVER}/demo/config.json`, { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const config = await response.json();
    apps = Array.isArray(config.apps) ? config.apps.filter((a) => typeof a === "string") : [];
  } catch (e) {
    showError("config_failed", `cannot read /demo/config.json: ${e.message}`);
  }
  if (apps.length === 0) {
    el.app.append(node("option", { value: "", text: "(no app hands out development tokens)" }));
    el.app.disabled = true;
    if (!el.lastError.textContent) {
      showError("no_demo_app", "no app sets dev_tokens = true in the gateway's config");
    }
    return false;
  }
  el.app.replaceChildren(...apps.map((a) => node("option", { value: a, text: a })));
  if (params.get("app") && apps.includes(params.get("app"))) el.app.value = params.get("app");
  return true;
}

el.connectForm.addEventListener("submit", (e) => {
  e.preventDefault();
  start();
});
el.disconnect.addEventListener("click", stop);
for (const b of document.querySelectorAll("button[data-uid]")) {
  b.addEventListener("click", () => {
    el.uid.value = b.dataset.uid;
    el.to.value = PARTNER[b.dataset.uid] || "";
    el.uid.focus();
  });
}

el.sendForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const to = el.to.value.trim();
  const text = el.text.value;
  if (!client || !to || !text) return;
  const row = showSent(to, text);
  el.text.value = "";
  el.text.focus();
  client.send(to, { text }).then(row.acked, row.failed);
});

el.channelForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const channel = el.channel.value.trim();
  if (!client || !channel) return;
  client.subscribe(channel).then(
    () => {
      note(`subscribed to ${channel}`);
      renderChannels();
    },
    (err) => showError(err.code, err.message),
  );
});
el.unsubscribe.addEventListener("click", () => {
  const channel = el.channel.value.trim();
  if (!client || !channel) return;
  client.unsubscribe(channel).then(
    () => {
      note(`unsubscribed from ${channel}`);
      renderChannels();
    },
    (err) => showError(err.code, err.message),
  );
});
el.publishForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const channel = el.channel.value.trim();
  const text = el.publishText.value;
  if (!client || !channel || !text) return;
  const row = showSent(channel, text, `#${channel}`);
  el.publishText.value = "";
  client.publish(channel, { text }).then(row.acked, row.failed);
});

// The state of a page that has not connected yet.
showState("idle");
const params = new URLSearchParams(location.search);
if (params.get("uid")) el.uid.value = params.get("uid");
if (params.get("to")) el.to.value = params.get("to");
const ready = await loadApps();
document.body.dataset.ready = "true";
if (ready && params.get("autoconnect") === "1" && el.uid.value) start();

// For the developer console: switchboardDemo.client is the live SwitchboardClient.
window.switchboardDemo = {
  get client() {
    return client;
  },
};
