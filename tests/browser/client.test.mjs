// Unit tests of clients/js/switchboard.js in Node, with a scripted fake gateway (fake
// WebSocket and fetch). They cover what a real gateway rarely shows on demand: heartbeat
// loss, reconnect frames with addresses, refused tokens, backoff, timeouts. No binary and no
// browser needed: `node --test tests/browser/client.test.mjs`.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  SwitchboardClient,
  SwitchboardError,
  backoffDelay,
  chooseAddress,
} from "../../clients/js/switchboard.js";

const WAIT = 3000;

/**
 * A fake gateway: answers /route, accepts WebSockets, and lets a test script what the server
 * says. `onConnect(conn)` decides how a new connection is greeted (default: accepted).
 */
class FakeGateway {
  constructor({ route, onConnect, onFrame } = {}) {
    this.routes = 0;
    this.route =
      route ||
      (() => ({ status: 200, body: { tcp_addr: "", ws_addr: "ws://node-a:5200", wss_addr: "wss://node-a:5300" } }));
    this.onConnect = onConnect || ((conn) => conn.accept());
    this.onFrame = onFrame || ((conn, frame) => conn.answer(frame));
    this.conns = [];
    this.routeUrls = [];
    const gw = this;

    this.fetch = async (url) => {
      gw.routes++;
      gw.routeUrls.push(url);
      const answer = await gw.route(url);
      if (answer instanceof Error) throw answer;
      return { ok: answer.status < 300, status: answer.status, json: async () => answer.body };
    };

    this.WebSocket = class FakeWebSocket {
      constructor(url) {
        this.url = url;
        this.sent = [];
        this.closed = false;
        this.onopen = this.onmessage = this.onerror = this.onclose = null;
        const conn = new Conn(gw, this);
        gw.conns.push(conn);
        setTimeout(() => gw.onConnect(conn), 1);
      }
      send(text) {
        if (this.closed) return;
        const frame = JSON.parse(text);
        this.sent.push(frame);
        setTimeout(() => gw.onFrame(gw.conns.find((c) => c.ws === this), frame), 1);
      }
      close(code = 1005, reason = "") {
        if (this.closed) return;
        this.closed = true;
        this.clientClosed = { code, reason };
        setTimeout(() => this.onclose?.({ code, reason, wasClean: true }), 1);
      }
    };
  }

  get last() {
    return this.conns[this.conns.length - 1];
  }
}

class Conn {
  constructor(gw, ws) {
    this.gw = gw;
    this.ws = ws;
    this.id = gw.conns.length + 1;
  }
  get url() {
    return new URL(this.ws.url);
  }
  get token() {
    return this.url.searchParams.get("token");
  }
  say(frame) {
    if (!this.ws.closed) this.ws.onmessage?.({ data: JSON.stringify(frame) });
  }
  accept(extra = {}) {
    this.ws.onopen?.({});
    this.say({
      type: "connected",
      uid: "alice",
      conn_id: String(this.id),
      node_id: "node-a",
      ping_interval_ms: 25000,
      idle_timeout_ms: 60000,
      ...extra,
    });
  }
  /** The server closes the connection (after an error frame, when code is given). */
  drop({ error, closeCode = 1006, reason = "" } = {}) {
    if (error) this.say({ type: "error", code: error, message: `server says ${error}`, fatal: true });
    if (this.ws.closed) return;
    this.ws.closed = true;
    this.ws.onclose?.({ code: closeCode, reason: reason || error || "", wasClean: closeCode !== 1006 });
  }
  /** The default server behaviour: ack sends/publishes, confirm (un)subscribes, pong pings. */
  answer(frame) {
    const id = frame.client_id;
    switch (frame.type) {
      case "send":
      case "publish":
        return this.say({ type: "ack", client_id: id, msg_id: `m${id}`, status: "delivered", delivered: 1 });
      case "subscribe":
        return this.say({ type: "subscribed", channel: frame.channel, client_id: id });
      case "unsubscribe":
        return this.say({ type: "unsubscribed", channel: frame.channel, client_id: id });
      case "ping":
        return this.say({ type: "pong" });
    }
  }
}

function client(gw, options = {}) {
  const c = new SwitchboardClient({
    server: "http://gw.test",
    appId: "demo",
    uid: "alice",
    token: "t0",
    WebSocket: gw.WebSocket,
    fetch: gw.fetch,
    initialDelayMs: 5,
    maxDelayMs: 40,
    jitter: 0,
    ...options,
  });
  c.states = [];
  c.errors = [];
  c.messages = [];
  c.on("state", (d) => c.states.push(d));
  c.on("error", (d) => c.errors.push(d));
  c.on("message", (d) => c.messages.push(d));
  return c;
}

/** Resolves when `predicate()` holds (checked every 2 ms); fails after WAIT. */
async function until(predicate, what) {
  const deadline = Date.now() + WAIT;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

const stateNames = (c) => c.states.map((s) => s.state);

describe("address choice and backoff", () => {
  test("chooseAddress avoids mixed content", () => {
    const both = { ws_addr: "ws://a:1", wss_addr: "wss://a:2" };
    assert.equal(chooseAddress(both, false), "ws://a:1");
    assert.equal(chooseAddress(both, true), "wss://a:2");
    assert.equal(chooseAddress({ ws_addr: "", wss_addr: "wss://a:2" }, false), "wss://a:2");
    assert.equal(chooseAddress({ ws_addr: "ws://a:1", wss_addr: "" }, true), "");
    assert.equal(chooseAddress({}, false), "");
  });

  test("backoffDelay doubles up to the cap; full jitter stays below it", () => {
    const o = { initialDelayMs: 100, maxDelayMs: 1000, multiplier: 2, jitter: 0 };
    assert.deepEqual([0, 1, 2, 3, 4, 5].map((n) => backoffDelay(n, o)), [100, 200, 400, 800, 1000, 1000]);
    const full = { ...o, jitter: 1 };
    assert.equal(backoffDelay(3, full, () => 0), 800);
    assert.equal(backoffDelay(3, full, () => 0.5), 400);
    assert.equal(backoffDelay(3, full, () => 0.999999), 0);
  });

  test("an https: server only gets wss: addresses; none is an error, retried", async () => {
    let n = 0;
    const gw = new FakeGateway({
      route: () => ({ status: 200, body: { ws_addr: "ws://a:1", wss_addr: n++ < 1 ? "" : "wss://a:2" } }),
    });
    const c = client(gw, { server: "https://gw.test/" });
    assert.equal(c.secure, true);
    await c.connect();
    assert.equal(c.connection.address, "wss://a:2");
    assert.equal(c.errors[0].code, "no_address");
    assert.ok(gw.routeUrls.every((u) => u.startsWith("https://gw.test/route?")), gw.routeUrls.join());
    c.close();
  });
});

describe("connecting", () => {
  test("asks /route, connects with app id and token, reports states", async () => {
    const gw = new FakeGateway();
    const c = client(gw);
    assert.equal(c.state, "idle");
    await c.connect();
    assert.deepEqual(stateNames(c), ["routing", "connecting", "connected"]);
    const url = new URL(gw.routeUrls[0]);
    assert.equal(url.pathname, "/route");
    assert.equal(url.searchParams.get("intranet"), "0");
    assert.equal(url.searchParams.get("uid"), "alice");
    assert.equal(gw.last.url.origin + gw.last.url.pathname, "ws://node-a:5200/ws/connect");
    assert.equal(gw.last.url.searchParams.get("app_id"), "demo");
    assert.equal(gw.last.token, "t0");
    assert.equal(c.states[1].address, "ws://node-a:5200");
    assert.deepEqual(c.connection, {
      uid: "alice",
      connId: "1",
      nodeId: "node-a",
      pingIntervalMs: 25000,
      idleTimeoutMs: 60000,
      address: "ws://node-a:5200",
      source: "route",
    });
    c.close();
    assert.equal(c.state, "closed");
    await until(() => gw.last.ws.closed, "the socket to close");
  });

  test("a token function is called on every attempt, told why the last one failed", async () => {
    const calls = [];
    const gw = new FakeGateway({
      onConnect: (conn) => (conn.token === "fresh-2" ? conn.accept() : conn.drop({ error: "token_expired", closeCode: 4001 })),
    });
    const c = client(gw, {
      token: async (ctx) => {
        calls.push(ctx);
        return `fresh-${calls.length}`;
      },
    });
    await c.connect();
    assert.deepEqual(calls, [
      { attempt: 1, reason: undefined },
      { attempt: 2, reason: "token_expired" },
    ]);
    assert.equal(c.errors[0].code, "token_expired");
    c.close();
  });

  test("a fixed token that is refused stops the client", async () => {
    const gw = new FakeGateway({ onConnect: (conn) => conn.drop({ error: "token_signature", closeCode: 4001 }) });
    const c = client(gw);
    await assert.rejects(c.connect(), (e) => e instanceof SwitchboardError && e.code === "token_signature");
    assert.equal(c.state, "closed");
    assert.deepEqual(c.states.at(-1).reason.code, "token_signature");
    assert.equal(c.errors.length, 1);
    await new Promise((r) => setTimeout(r, 30));
    assert.equal(gw.conns.length, 1, "no second attempt");
  });

  test("fresh tokens refused again and again: the client gives up after maxAuthRetries", async () => {
    const gw = new FakeGateway({ onConnect: (conn) => conn.drop({ error: "auth_rejected", closeCode: 4001 }) });
    const c = client(gw, { token: () => "again", maxAuthRetries: 2 });
    await assert.rejects(c.connect(), { code: "auth_rejected" });
    assert.equal(gw.conns.length, 3);
  });

  test("a close code 4001 without an error frame counts as an auth failure", async () => {
    const gw = new FakeGateway({ onConnect: (conn) => conn.drop({ closeCode: 4001, reason: "token_claims" }) });
    const c = client(gw);
    await assert.rejects(c.connect(), { code: "token_claims" });
  });

  test("unknown_app stops even with a token function", async () => {
    const gw = new FakeGateway({ onConnect: (conn) => conn.drop({ error: "unknown_app", closeCode: 4001 }) });
    const c = client(gw, { token: () => "x" });
    await assert.rejects(c.connect(), { code: "unknown_app" });
    assert.equal(gw.conns.length, 1);
  });

  test("a token function that throws is retried; one whose error is fatal stops the client", async () => {
    let n = 0;
    const gw = new FakeGateway();
    const c = client(gw, {
      token: () => {
        if (++n === 1) throw new Error("token server down");
        return "ok";
      },
    });
    await c.connect();
    assert.equal(c.errors[0].code, "token_failed");
    c.close();

    const d = client(gw, {
      token: () => {
        throw Object.assign(new Error("dev tokens are off"), { code: "dev_tokens_disabled", fatal: true });
      },
    });
    await assert.rejects(d.connect(), { code: "dev_tokens_disabled" });
  });

  test("/route: 4xx stops the client, 5xx and network errors are retried", async () => {
    let n = 0;
    const gw = new FakeGateway({
      route: () => {
        n++;
        if (n === 1) return new TypeError("Failed to fetch");
        if (n === 2) return { status: 503, body: { error: { code: "draining", message: "later" } } };
        return { status: 200, body: { ws_addr: "ws://b:1", wss_addr: "" } };
      },
    });
    const c = client(gw);
    await c.connect();
    assert.deepEqual(
      c.errors.map((e) => e.code),
      ["route_failed", "draining"],
    );
    c.close();

    const bad = new FakeGateway({
      route: () => ({ status: 400, body: { error: { code: "invalid_uid", message: "uid is bad" } } }),
    });
    const d = client(bad);
    await assert.rejects(d.connect(), { code: "invalid_uid" });
    assert.equal(bad.routes, 1);
  });

  test("no connected frame within connectTimeoutMs: connect_timeout, and another attempt", async () => {
    let n = 0;
    const gw = new FakeGateway({ onConnect: (conn) => (n++ === 0 ? conn.ws.onopen?.({}) : conn.accept()) });
    const c = client(gw, { connectTimeoutMs: 100 });
    await c.connect();
    assert.equal(c.errors[0].code, "connect_timeout");
    assert.ok(gw.conns.length >= 2);
    c.close();
  });
});

describe("requests", () => {
  test("send resolves with the ack matched by client_id; errors reject with the server's code", async () => {
    const gw = new FakeGateway({
      onFrame: (conn, frame) => {
        if (frame.to === "nobody") {
          conn.say({ type: "error", code: "invalid_recipient", message: "bad to", client_id: frame.client_id });
        } else if (frame.to === "second") {
          // Acks may come out of order.
          setTimeout(() => conn.answer(frame), 20);
        } else {
          conn.answer(frame);
        }
      },
    });
    const c = client(gw);
    await c.connect();
    const slow = c.send("second", { n: 2 });
    const fast = await c.send("bob", { text: "hi" });
    assert.equal(fast.type, "ack");
    assert.equal(fast.status, "delivered");
    const sent = gw.last.ws.sent.find((f) => f.to === "bob");
    assert.deepEqual(sent.data, { text: "hi" });
    assert.equal(sent.type, "send");
    assert.equal(fast.client_id, sent.client_id);
    assert.equal((await slow).client_id, gw.last.ws.sent.find((f) => f.to === "second").client_id);
    await assert.rejects(c.send("nobody", 1), (e) => {
      assert.equal(e.code, "invalid_recipient");
      assert.equal(e.frame.message, "bad to");
      return true;
    });
    assert.equal(c.errors.length, 0, "answered errors are not error events");
    c.close();
  });

  test("ack: false sends without waiting; a later refusal is an error event with the client id", async () => {
    const gw = new FakeGateway({
      onFrame: (conn, frame) => {
        if (frame.ack === false && frame.to === "nobody") {
          conn.say({ type: "error", code: "invalid_recipient", message: "bad to", client_id: frame.client_id });
        } else if (frame.ack !== false) {
          conn.answer(frame);
        }
      },
    });
    const c = client(gw);
    await c.connect();
    const quiet = await c.send("bob", { typing: true }, { ack: false });
    const sent = gw.last.ws.sent.find((f) => f.to === "bob");
    assert.equal(sent.ack, false);
    assert.equal(quiet.client_id, sent.client_id);
    const refused = await c.send("nobody", 1, { ack: false });
    await until(() => c.errors.length === 1, "the refusal as an error event");
    assert.equal(c.errors[0].code, "invalid_recipient");
    assert.equal(c.errors[0].clientId, refused.client_id);
    // Other requests still wait for their answer, and ignore the option.
    const sub = await c.subscribe("room", { ack: false });
    assert.equal(sub.type, "subscribed");
    assert.equal(gw.last.ws.sent.find((f) => f.type === "subscribe").ack, undefined);
    assert.equal((await c.send("bob", 2)).type, "ack");
    c.close();
  });

  test("not_connected, timeout, connection_lost, closed", async () => {
    const gw = new FakeGateway({ onFrame: () => {} });
    const c = client(gw, { requestTimeoutMs: 20 });
    await assert.rejects(c.send("bob", 1), { code: "not_connected" });
    await c.connect();
    await assert.rejects(c.send("bob", 1), { code: "timeout" });
    const lost = c.send("bob", 2, { timeoutMs: 0 });
    gw.last.drop();
    await assert.rejects(lost, { code: "connection_lost" });
    await until(() => c.state === "connected", "the reconnect");
    const closing = c.publish("room", 3, { timeoutMs: 0 });
    c.close();
    await assert.rejects(closing, { code: "closed" });
  });

  test("subscriptions are made again after a reconnect; unsubscribe while away forgets", async () => {
    const gw = new FakeGateway();
    const c = client(gw);
    await c.connect();
    await c.subscribe("room:1");
    await c.subscribe("room:2");
    assert.deepEqual(c.channels, ["room:1", "room:2"]);
    gw.last.drop();
    await until(() => c.state === "connected", "the reconnect");
    await until(() => gw.last.ws.sent.filter((f) => f.type === "subscribe").length === 2, "the subscriptions again");
    assert.deepEqual(
      gw.last.ws.sent.map((f) => f.channel),
      ["room:1", "room:2"],
    );
    c.close();
    assert.deepEqual(await c.unsubscribe("room:2"), {
      type: "unsubscribed",
      channel: "room:2",
      local: true,
      subscribed: true,
    });
    assert.deepEqual(c.channels, ["room:1"]);
  });

  test("message frames become message events", async () => {
    const gw = new FakeGateway();
    const c = client(gw);
    await c.connect();
    const frame = { type: "message", from: "bob", to: "alice", event: 1, data: { text: "yo" }, msg_id: "1" };
    gw.last.say(frame);
    assert.deepEqual(c.messages, [frame]);
    c.close();
  });

  test("asks for batched frames and takes a batch apart, line by line", async () => {
    const gw = new FakeGateway({ onConnect: (conn) => conn.accept({ batch: true }) });
    gw.onFrame = () => {};
    const c = client(gw);
    await c.connect();
    assert.equal(gw.last.url.searchParams.get("batch"), "1");
    const acked = c.send("bob", { n: 1 });
    const id = gw.last.ws.sent[0].client_id;
    const m1 = { type: "message", from: "bob", to: "alice", event: 1, data: { n: 1 }, msg_id: "1" };
    const m2 = { ...m1, data: { n: 2 }, msg_id: "2" };
    const ack = { type: "ack", client_id: id, msg_id: "m", status: "delivered", delivered: 1 };
    gw.last.ws.onmessage({ data: [m1, ack, m2].map((f) => JSON.stringify(f)).join("\n") });
    assert.deepEqual(c.messages, [m1, m2]);
    assert.equal((await acked).status, "delivered");
    assert.deepEqual(c.errors, []);
    c.close();
  });

  test("from a node that does not batch, a newline inside a frame is part of it", async () => {
    const gw = new FakeGateway();
    const c = client(gw);
    await c.connect();
    gw.last.ws.onmessage({ data: '{"type":"message","from":"bob","data":{\n"k":1}}' });
    assert.deepEqual(c.messages, [{ type: "message", from: "bob", data: { k: 1 } }]);
    assert.deepEqual(c.errors, []);
    c.close();
  });
});

describe("staying connected", () => {
  test("pings at ping_interval_ms; silence past idle_timeout_ms reconnects", async () => {
    let answer = true;
    const gw = new FakeGateway({
      onConnect: (conn) => conn.accept({ ping_interval_ms: 10, idle_timeout_ms: 250 }),
      onFrame: (conn, frame) => answer && conn.answer(frame),
    });
    const c = client(gw);
    await c.connect();
    await until(() => gw.last.ws.sent.filter((f) => f.type === "ping").length >= 5, "five pings");
    assert.equal(c.state, "connected", "pongs keep the connection");
    assert.equal(gw.conns.length, 1);
    answer = false;
    await until(() => c.errors.some((e) => e.code === "heartbeat_timeout"), "the heartbeat timeout");
    assert.equal(gw.conns[0].ws.closed, true);
    answer = true;
    await until(() => c.state === "connected" && gw.conns.length === 2, "the new connection");
    c.close();
  });

  test("a reconnect frame: its address and delay are used, /route is skipped", async () => {
    const gw = new FakeGateway();
    const c = client(gw, { initialDelayMs: 1000, maxDelayMs: 1000 });
    await c.connect();
    assert.equal(gw.routes, 1);
    const t0 = Date.now();
    gw.last.say({ type: "reconnect", reason: "node_draining", tcp_addr: "", ws_addr: "ws://node-b:5200", wss_addr: "", delay_ms: 30 });
    gw.last.drop({ error: "node_draining", closeCode: 1001 });
    await until(() => c.state === "connected" && gw.conns.length === 2, "the move");
    assert.ok(Date.now() - t0 >= 25, "delay_ms was waited");
    assert.ok(Date.now() - t0 < 900, "the backoff delay was not");
    assert.equal(gw.routes, 1, "no /route");
    assert.equal(gw.last.url.host, "node-b:5200");
    assert.equal(c.connection.source, "reconnect");
    const reconnecting = c.states.find((s) => s.state === "reconnecting");
    assert.equal(reconnecting.delayMs, 30);
    assert.equal(reconnecting.reason.code, "node_draining");
    assert.deepEqual(c.errors, [], "an orderly move is no error");

    // Without addresses (a single node shutting down): /route again.
    gw.last.say({ type: "reconnect", reason: "server_shutdown", tcp_addr: "", ws_addr: "", wss_addr: "", delay_ms: 0 });
    gw.last.drop({ error: "server_shutdown", closeCode: 1001 });
    await until(() => c.state === "connected" && gw.conns.length === 3, "the reconnect");
    assert.equal(gw.routes, 2);
    assert.equal(gw.last.url.host, "node-a:5200");
    c.close();
  });

  test("the backoff grows while attempts fail and starts over after a connection", async () => {
    let up = true;
    const gw = new FakeGateway({ onConnect: (conn) => (up ? conn.accept() : conn.drop()) });
    const c = client(gw, { initialDelayMs: 2, maxDelayMs: 16, multiplier: 2, jitter: 0 });
    await c.connect();
    up = false;
    gw.last.drop();
    await until(() => c.states.filter((s) => s.state === "reconnecting").length >= 6, "six retries");
    up = true;
    await until(() => c.state === "connected", "the reconnect");
    const delays = c.states.filter((s) => s.state === "reconnecting").map((s) => s.delayMs);
    assert.deepEqual(delays.slice(0, 6), [2, 4, 8, 16, 16, 16]);
    gw.last.drop();
    await until(() => c.states.filter((s) => s.state === "reconnecting").length === delays.length + 1, "a retry");
    assert.equal(c.states.filter((s) => s.state === "reconnecting").at(-1).delayMs, 2, "reset");
    c.close();
  });

  test("close() while waiting to reconnect stops for good; connect() starts again", async () => {
    const gw = new FakeGateway();
    const c = client(gw, { initialDelayMs: 50, maxDelayMs: 50 });
    await c.connect();
    gw.last.drop();
    await until(() => c.state === "reconnecting", "reconnecting");
    c.close();
    assert.equal(c.state, "closed");
    await new Promise((r) => setTimeout(r, 80));
    assert.equal(gw.conns.length, 1);
    await c.connect();
    assert.equal(gw.conns.length, 2);
    c.close();
  });

  test("reconnect: false stops at the first loss", async () => {
    const gw = new FakeGateway();
    const c = client(gw, { reconnect: false });
    await c.connect();
    gw.last.drop();
    await until(() => c.state === "closed", "closed");
    assert.equal(c.states.at(-1).reason.code, "connection_lost");
  });
});
