// switchboard.js: the browser client of the switchboard gateway.
//
// One dependency-free ES module; no build step. In a page:
//
//   <script type="module">
//     import { SwitchboardClient } from "/demo/switchboard.js";
//     const client = new SwitchboardClient({ appId: "demo", uid: "alice", token: fetchToken });
//     client.addEventListener("message", (e) => console.log(e.detail.data));
//     await client.connect();
//     const ack = await client.send("bob", { text: "hi" });
//   </script>
//
// The wire protocol is docs/protocol.md; route discovery is docs/http-api.md. README.md next
// to this file describes the API; switchboard.d.ts declares it.

/** The states a client goes through, in the order of a normal start. */
export const STATES = Object.freeze(["idle", "routing", "connecting", "connected", "reconnecting", "closed"]);

/**
 * Server error codes that end the connection because of the credentials. With a `token`
 * function the client fetches a fresh token and tries again; with a fixed token it stops.
 */
export const AUTH_ERROR_CODES = Object.freeze([
  "token_missing",
  "token_malformed",
  "token_algorithm",
  "token_signature",
  "token_expired",
  "token_not_yet_valid",
  "token_claims",
  "auth_rejected",
]);

/** Server error codes after which retrying cannot help: the client stops (state `closed`). */
export const TERMINAL_ERROR_CODES = Object.freeze(["unknown_app"]);

const AUTH = new Set(AUTH_ERROR_CODES);
const TERMINAL = new Set(TERMINAL_ERROR_CODES);
/** The WebSocket close code the server uses for authentication failures. */
const CLOSE_AUTH = 4001;
/** Close reasons the server sends are stable error codes: lower-case words and underscores. */
const CODE_SHAPE = /^[a-z][a-z0-9_]*$/;

const DEFAULTS = Object.freeze({
  initialDelayMs: 500,
  maxDelayMs: 30000,
  multiplier: 2,
  jitter: 1,
  connectTimeoutMs: 15000,
  requestTimeoutMs: 10000,
  maxAuthRetries: 3,
  pingIntervalMs: 25000,
  idleTimeoutMs: 60000,
});

/** An error with a stable `code`: the server's error code, or one of the client's own. */
export class SwitchboardError extends Error {
  /**
   * @param {string} code
   * @param {string} [message]
   * @param {{frame?: object, clientId?: string, cause?: unknown, status?: number, fatal?: boolean}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message || code, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = "SwitchboardError";
    this.code = code;
    if (extra.frame !== undefined) this.frame = extra.frame;
    if (extra.clientId !== undefined) this.clientId = extra.clientId;
    if (extra.status !== undefined) this.status = extra.status;
    if (extra.fatal !== undefined) this.fatal = extra.fatal;
  }
}

/**
 * Picks the WebSocket address to use from a route answer (or a `reconnect` frame).
 * `secure`: the page or the route server is https:, so only wss: may be used (a browser
 * blocks ws: from an https: page as mixed content). Returns "" when nothing usable is there.
 * @param {{ws_addr?: string, wss_addr?: string}} addrs
 * @param {boolean} secure
 */
export function chooseAddress(addrs, secure) {
  const ws = (addrs && typeof addrs.ws_addr === "string" && addrs.ws_addr) || "";
  const wss = (addrs && typeof addrs.wss_addr === "string" && addrs.wss_addr) || "";
  if (secure) return wss;
  // wss: from an http: page is allowed, so it is the fallback.
  return ws || wss;
}

/**
 * The delay before reconnect attempt number `failures` (0 for the first retry after a
 * working connection): exponential, capped, with jitter ("full jitter" when jitter is 1:
 * uniformly random between 0 and the capped exponential).
 */
export function backoffDelay(failures, { initialDelayMs, maxDelayMs, multiplier, jitter }, random = Math.random) {
  const cap = Math.min(maxDelayMs, initialDelayMs * Math.pow(multiplier, Math.max(0, failures)));
  const j = Math.min(1, Math.max(0, jitter));
  return Math.round(cap * (1 - j * random()));
}

function trimSlashes(url) {
  return String(url).replace(/\/+$/, "");
}

/** Resolves after `ms`, or rejects with an AbortError as soon as `signal` aborts. */
function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(abortError());
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, Math.max(0, ms));
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortError());
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

function abortError() {
  return new SwitchboardError("closed", "the client was closed");
}

/** A promise racing `signal`: rejects with the abort error as soon as the client closes. */
function untilAborted(promise, signal) {
  if (signal.aborted) return Promise.reject(abortError());
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(abortError());
    signal.addEventListener("abort", onAbort, { once: true });
    Promise.resolve(promise).then(
      (v) => {
        signal.removeEventListener("abort", onAbort);
        resolve(v);
      },
      (e) => {
        signal.removeEventListener("abort", onAbort);
        reject(e);
      },
    );
  });
}

/**
 * A client of one user of one app. It finds its node with `GET /route`, holds one WebSocket
 * connection, keeps it alive with heartbeats, and reconnects on its own (exponential backoff
 * with jitter, asking `/route` again each time) until `close()`.
 *
 * Events (it is an `EventTarget`; each event is a `CustomEvent` whose `detail` carries the data,
 * and `on(type, fn)` is a shortcut that calls `fn(detail)`):
 * - `state`: `{state, previous, ...details}` on every state change;
 * - `message`: the `message` frame the server delivered (`{from, to, data, msg_id, ...}`);
 * - `error`: `{code, message, ...}` for failures that are not the answer to a request.
 */
export class SwitchboardClient extends EventTarget {
  #opts;
  #state = "idle";
  /** The current run (from connect() to close() or a terminal failure). */
  #run = null;
  /** The live connection, once its `connected` frame arrived. */
  #conn = null;
  /** client_id -> {resolve, reject, timer, kind, channel} */
  #pending = new Map();
  #nextId = 1;
  #idPrefix;
  /** Channels the server confirmed; subscribed again after every reconnect. */
  #channels = new Set();
  /** Waiters of connect(). */
  #connectWaiters = [];

  /**
   * @param {object} options see switchboard.d.ts (SwitchboardOptions)
   */
  constructor(options = {}) {
    super();
    const o = { ...DEFAULTS, ...options };
    const backoff = options.backoff || {};
    for (const key of ["initialDelayMs", "maxDelayMs", "multiplier", "jitter"]) {
      if (backoff[key] !== undefined) o[key] = backoff[key];
    }
    if (!o.server) {
      const origin = globalThis.location && globalThis.location.origin;
      if (!origin || origin === "null") {
        throw new TypeError("SwitchboardClient: `server` is required outside a page served over http(s)");
      }
      o.server = origin;
    }
    o.server = trimSlashes(o.server);
    if (!/^https?:\/\//i.test(o.server)) {
      throw new TypeError(`SwitchboardClient: \`server\` must be an http: or https: URL, got ${JSON.stringify(o.server)}`);
    }
    if (typeof o.appId !== "string" || o.appId === "") throw new TypeError("SwitchboardClient: `appId` is required");
    if (o.uid !== undefined && (typeof o.uid !== "string" || o.uid === "")) {
      throw new TypeError("SwitchboardClient: `uid` must be a non-empty string");
    }
    if (typeof o.token !== "string" && typeof o.token !== "function") {
      throw new TypeError("SwitchboardClient: `token` must be a string or a function returning one");
    }
    for (const key of ["initialDelayMs", "maxDelayMs", "multiplier", "connectTimeoutMs", "requestTimeoutMs"]) {
      if (typeof o[key] !== "number" || !(o[key] > 0)) {
        throw new TypeError(`SwitchboardClient: \`${key}\` must be a positive number`);
      }
    }
    if (typeof o.jitter !== "number" || o.jitter < 0 || o.jitter > 1) {
      throw new TypeError("SwitchboardClient: `jitter` must be a number from 0 (none) to 1 (full jitter)");
    }
    o.WebSocket = o.WebSocket || globalThis.WebSocket;
    o.fetch = o.fetch || (globalThis.fetch && globalThis.fetch.bind(globalThis));
    o.random = o.random || Math.random;
    if (typeof o.WebSocket !== "function") throw new TypeError("SwitchboardClient: no WebSocket implementation");
    if (typeof o.fetch !== "function") throw new TypeError("SwitchboardClient: no fetch implementation");
    o.reconnect = o.reconnect !== false;
    this.#opts = o;
    this.#idPrefix = Math.floor(o.random() * 0x7fffffff).toString(36);
  }

  /** The current state: idle | routing | connecting | connected | reconnecting | closed. */
  get state() {
    return this.#state;
  }

  /** What the `connected` frame said, and where: null unless the state is `connected`. */
  get connection() {
    return this.#conn ? { ...this.#conn.info } : null;
  }

  /** The channels this client is subscribed to (confirmed by the server). */
  get channels() {
    return [...this.#channels];
  }

  /** The route server's base URL in use. */
  get server() {
    return this.#opts.server;
  }

  /** Whether only wss: addresses may be used (the page or the route server is https:). */
  get secure() {
    const page = globalThis.location && globalThis.location.protocol;
    return page === "https:" || this.#opts.server.toLowerCase().startsWith("https:");
  }

  /**
   * Adds `listener(detail)` for `type` (`state`, `message`, `error`); returns a function
   * that removes it.
   */
  on(type, listener) {
    const wrapped = (event) => listener(event.detail);
    this.addEventListener(type, wrapped);
    return () => this.removeEventListener(type, wrapped);
  }

  /**
   * Starts connecting (from `idle` or `closed`; otherwise it only waits). Resolves once the
   * client is connected; rejects with a SwitchboardError if it stops (state `closed`: close()
   * was called, or a failure that retrying cannot fix) first. It keeps reconnecting after
   * the promise settled.
   */
  connect() {
    const promise = new Promise((resolve, reject) => {
      if (this.#state === "connected") return resolve();
      this.#connectWaiters.push({ resolve, reject });
    });
    if (this.#state === "idle" || this.#state === "closed") {
      const run = { controller: new AbortController() };
      run.signal = run.controller.signal;
      this.#run = run;
      this.#loop(run).catch((e) => {
        // #loop handles its own failures; this is a bug guard so nothing goes unnoticed.
        if (this.#run === run) this.#stop(new SwitchboardError("internal_error", String(e && e.message), { cause: e }));
      });
    }
    return promise;
  }

  /**
   * Stops: closes the connection, stops reconnecting, rejects what is pending with code
   * `closed`. connect() may be called again afterwards; subscriptions are kept for it.
   */
  close() {
    if (!this.#run) {
      if (this.#state !== "closed" && this.#state !== "idle") this.#setState("closed", { reason: { code: "closed", message: "closed by the application" } });
      return;
    }
    this.#stop(new SwitchboardError("closed", "closed by the application"), false);
  }

  /**
   * Sends `data` (any JSON value) to user `to` of the same app. Resolves with the server's
   * `ack` (`{msg_id, status, delivered, ...}`); rejects with a SwitchboardError whose `code` is
   * the server's error code, or `not_connected`, `connection_lost`, `timeout`, `closed`.
   * With `{ack: false}`: fire and forget, resolved with `{client_id}` once handed to the
   * socket; a refusal arrives later as an `error` event carrying that `clientId`.
   */
  send(to, data, options = {}) {
    return this.#request("send", { type: "send", to, data }, options);
  }

  /** Subscribes to `channel`; resolves with the `subscribed` frame. Kept across reconnects. */
  subscribe(channel, options = {}) {
    return this.#request("subscribe", { type: "subscribe", channel }, options).then((frame) => {
      this.#channels.add(channel);
      return frame;
    });
  }

  /**
   * Unsubscribes from `channel`; resolves with the `unsubscribed` frame. While not connected
   * the channel is just forgotten (there is no subscription on the server to end) and the
   * promise resolves with `{type: "unsubscribed", channel, local: true}`.
   */
  unsubscribe(channel, options = {}) {
    const wasKept = this.#channels.delete(channel);
    if (!this.#conn) {
      return Promise.resolve({ type: "unsubscribed", channel, local: true, subscribed: wasKept });
    }
    return this.#request("unsubscribe", { type: "unsubscribe", channel }, options);
  }

  /**
   * Publishes `data` to `channel`; resolves with the `ack` (the app needs client_publish).
   * `{ack: false}` works as on `send`.
   */
  publish(channel, data, options = {}) {
    return this.#request("publish", { type: "publish", channel, data }, options);
  }

  // ---------------------------------------------------------------------------------------
  // Requests

  #request(kind, frame, { timeoutMs, ack } = {}) {
    const conn = this.#conn;
    if (!conn) {
      return Promise.reject(new SwitchboardError("not_connected", `cannot ${kind}: the client is ${this.#state}`));
    }
    const clientId = `${this.#idPrefix}-${this.#nextId++}`;
    // Only messages can go without an answer.
    const unanswered = ack === false && (kind === "send" || kind === "publish");
    let text;
    try {
      text = JSON.stringify(unanswered ? { ...frame, client_id: clientId, ack: false } : { ...frame, client_id: clientId });
    } catch (e) {
      return Promise.reject(new SwitchboardError("invalid_data", `cannot encode the frame: ${e && e.message}`, { cause: e }));
    }
    if (unanswered) {
      try {
        conn.ws.send(text);
      } catch (e) {
        return Promise.reject(new SwitchboardError("connection_lost", `cannot ${kind}: ${e && e.message}`, { clientId, cause: e }));
      }
      return Promise.resolve({ client_id: clientId });
    }
    return new Promise((resolve, reject) => {
      const wait = timeoutMs === undefined ? this.#opts.requestTimeoutMs : timeoutMs;
      const entry = { kind, resolve, reject, timer: null, conn };
      if (wait > 0 && Number.isFinite(wait)) {
        entry.timer = setTimeout(() => {
          this.#pending.delete(clientId);
          reject(new SwitchboardError("timeout", `no answer to ${kind} ${clientId} within ${wait} ms`, { clientId }));
        }, wait);
      }
      this.#pending.set(clientId, entry);
      try {
        conn.ws.send(text);
      } catch (e) {
        this.#settle(clientId, new SwitchboardError("connection_lost", `cannot ${kind}: ${e && e.message}`, { clientId, cause: e }));
      }
    });
  }

  /** Resolves (value) or rejects (SwitchboardError) the pending request `clientId`. */
  #settle(clientId, outcome) {
    const entry = this.#pending.get(clientId);
    if (!entry) return false;
    this.#pending.delete(clientId);
    if (entry.timer) clearTimeout(entry.timer);
    if (outcome instanceof Error) entry.reject(outcome);
    else entry.resolve(outcome);
    return true;
  }

  /** Rejects every request sent on `conn` (or every request at all when conn is null). */
  #failPending(conn, code, message) {
    for (const [clientId, entry] of [...this.#pending]) {
      if (conn === null || entry.conn === conn) {
        this.#settle(clientId, new SwitchboardError(code, `${entry.kind} ${clientId}: ${message}`, { clientId }));
      }
    }
  }

  // ---------------------------------------------------------------------------------------
  // State and events

  #setState(state, details = {}) {
    const previous = this.#state;
    this.#state = state;
    this.#emit("state", { ...details, state, previous });
    if (state === "connected") {
      for (const w of this.#connectWaiters.splice(0)) w.resolve();
    }
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  #emitError(error, extra = {}) {
    const detail = { code: error.code, message: error.message, ...extra };
    if (error.frame) detail.frame = error.frame;
    if (error.status !== undefined) detail.status = error.status;
    if (error.clientId !== undefined) detail.clientId = error.clientId;
    this.#emit("error", detail);
  }

  /** Ends the current run: state `closed`, connect() waiters and pending requests rejected. */
  #stop(reason, announce = true) {
    const run = this.#run;
    this.#run = null;
    if (run) run.controller.abort();
    const conn = this.#conn;
    this.#conn = null;
    if (conn) conn.dispose(1000, "client closed");
    this.#failPending(null, "closed", reason.code === "closed" ? "the client was closed" : `the client stopped: ${reason.code}`);
    if (announce) this.#emitError(reason, { fatal: true });
    const info = { code: reason.code, message: reason.message };
    this.#setState("closed", { reason: info });
    for (const w of this.#connectWaiters.splice(0)) w.reject(reason);
  }

  // ---------------------------------------------------------------------------------------
  // The connect / reconnect loop

  async #loop(run) {
    const o = this.#opts;
    let failures = 0; // attempts since the last connection that reached `connected`
    let authFailures = 0;
    let redirect = null; // the last `reconnect` frame
    let lastCode = undefined;
    for (let attempt = 1; ; attempt++) {
      const outcome = await this.#attempt(run, attempt, redirect, lastCode);
      if (run.signal.aborted) return;
      if (outcome.connected) {
        failures = 0;
        authFailures = 0;
      }
      const error = outcome.error;
      lastCode = error.code;
      if (outcome.kind === "terminal") return this.#stop(error, !outcome.reported);
      if (outcome.kind === "auth") {
        authFailures++;
        if (typeof o.token !== "function") return this.#stop(error, !outcome.reported);
        if (authFailures > o.maxAuthRetries) {
          return this.#stop(
            new SwitchboardError(error.code, `${error.message} (still refused after ${o.maxAuthRetries} fresh tokens)`, { frame: error.frame }),
            true,
          );
        }
      }
      if (!outcome.reported) this.#emitError(error, { fatal: false });
      if (!o.reconnect) return this.#stop(error, false);
      redirect = outcome.redirect || null;
      const delayMs = outcome.delayMs !== undefined ? outcome.delayMs : backoffDelay(failures, o, o.random);
      failures++;
      this.#setState("reconnecting", {
        attempt: attempt + 1,
        delayMs,
        reason: { code: error.code, message: error.message },
        redirect: redirect ? { ws_addr: redirect.ws_addr, wss_addr: redirect.wss_addr } : undefined,
      });
      try {
        await sleep(delayMs, run.signal);
      } catch {
        return; // closed while waiting
      }
    }
  }

  /**
   * One connection attempt, to its end: route, token, WebSocket, the whole session.
   * Resolves with `{kind: "retry"|"auth"|"terminal", error, connected, reported, delayMs?, redirect?}`.
   */
  async #attempt(run, attempt, redirect, lastCode) {
    const o = this.#opts;
    const secure = this.secure;
    // 1. Where to connect: the address a `reconnect` frame gave, else /route.
    let address = redirect ? chooseAddress(redirect, secure) : "";
    let source = "reconnect";
    let route;
    if (!address) {
      source = "route";
      this.#setState("routing", { attempt });
      try {
        route = await this.#fetchRoute(run.signal);
      } catch (e) {
        return this.#failure(e, run);
      }
      address = chooseAddress(route, secure);
      if (!address) {
        const message = secure
          ? "the route API offers no wss: address, and a ws: address cannot be used from an https: page"
          : "the route API offers no ws: or wss: address";
        return { kind: "retry", error: new SwitchboardError("no_address", message), connected: false };
      }
    }
    this.#setState("connecting", { attempt, address, source, route });
    // 2. The token, fresh on every attempt when it is a function.
    let token;
    try {
      token = typeof o.token === "function" ? await untilAborted(o.token({ attempt, reason: lastCode }), run.signal) : o.token;
      if (typeof token !== "string" || token === "") throw new SwitchboardError("token_failed", "the token function returned no token");
    } catch (e) {
      if (run.signal.aborted) return { kind: "aborted", error: abortError() };
      const fatal = e && e.fatal === true;
      const error = new SwitchboardError(
        fatal && e.code ? e.code : "token_failed",
        `could not get a token: ${(e && e.message) || e}`,
        { cause: e },
      );
      return { kind: fatal ? "terminal" : "retry", error, connected: false };
    }
    if (run.signal.aborted) return { kind: "aborted", error: abortError() };
    // 3. The connection, until it ends.
    // batch=1: frames written together arrive as one message, a line each (protocol.md).
    const url = `${trimSlashes(address)}/ws/connect?app_id=${encodeURIComponent(o.appId)}&token=${encodeURIComponent(token)}&batch=1`;
    return this.#session(run, url, address, source);
  }

  #failure(e, run) {
    if (run.signal.aborted) return { kind: "aborted", error: abortError() };
    const error = e instanceof SwitchboardError ? e : new SwitchboardError("route_failed", String((e && e.message) || e), { cause: e });
    return { kind: error.fatal ? "terminal" : "retry", error, connected: false };
  }

  async #fetchRoute(signal) {
    const o = this.#opts;
    const query = new URLSearchParams({ intranet: "0" });
    if (o.uid) query.set("uid", o.uid);
    query.set("app_id", o.appId);
    const url = `${o.server}/route?${query}`;
    const controller = new AbortController();
    const onAbort = () => controller.abort();
    signal.addEventListener("abort", onAbort, { once: true });
    const timer = setTimeout(() => controller.abort(), o.connectTimeoutMs);
    let response;
    let body;
    try {
      response = await o.fetch(url, { signal: controller.signal, cache: "no-store", headers: { accept: "application/json" } });
      body = await response.json().catch(() => null);
    } catch (e) {
      const timedOut = !signal.aborted && controller.signal.aborted;
      throw new SwitchboardError(
        "route_failed",
        timedOut ? `GET ${url}: no answer within ${o.connectTimeoutMs} ms` : `GET ${url}: ${(e && e.message) || e}`,
        { cause: e },
      );
    } finally {
      clearTimeout(timer);
      signal.removeEventListener("abort", onAbort);
    }
    if (!response.ok) {
      const err = body && body.error;
      const code = (err && typeof err.code === "string" && err.code) || "route_failed";
      const message = `GET ${url}: HTTP ${response.status}${err && err.message ? `: ${err.message}` : ""}`;
      // A 4xx says the request itself is wrong (bad uid, unknown app, wrong server URL):
      // asking again cannot help. 408 and 429 are the exceptions; 5xx is worth retrying.
      const fatal = response.status >= 400 && response.status < 500 && response.status !== 408 && response.status !== 429;
      throw new SwitchboardError(code, message, { status: response.status, fatal });
    }
    if (!body || typeof body !== "object") throw new SwitchboardError("route_failed", `GET ${url}: the answer is not a JSON object`);
    return body;
  }

  /** Opens the WebSocket and serves it until it closes; resolves with the attempt's outcome. */
  #session(run, url, address, source) {
    const o = this.#opts;
    return new Promise((resolve) => {
      let ws;
      try {
        ws = new o.WebSocket(url);
      } catch (e) {
        resolve({ kind: "retry", error: new SwitchboardError("connect_failed", `cannot open ${address}: ${(e && e.message) || e}`, { cause: e }), connected: false });
        return;
      }
      let connected = false;
      // The server said `"batch":true`: every message is frames, one per line. Until
      // `connected` a message is split too: a node that predates batching sends nothing
      // but its own compact frames before it, and those hold no newline.
      let batched = false;
      let ended = false;
      let errorFrame = null; // the last error frame not answering a request
      let reconnectFrame = null;
      let localError = null; // a failure this side detected (timeouts)
      let pingTimer = null;
      let idleTimer = null;
      let idleMs = DEFAULTS.idleTimeoutMs;
      const conn = { ws, info: null, dispose: null };

      const timers = () => {
        clearTimeout(connectTimer);
        clearInterval(pingTimer);
        clearTimeout(idleTimer);
      };
      const connectTimer = setTimeout(() => {
        localError = new SwitchboardError("connect_timeout", `no connected frame from ${address} within ${o.connectTimeoutMs} ms`);
        shut(4000, "connect_timeout");
      }, o.connectTimeoutMs);
      const armIdle = () => {
        clearTimeout(idleTimer);
        idleTimer = setTimeout(() => {
          localError = new SwitchboardError("heartbeat_timeout", `nothing received from ${address} for ${idleMs} ms`);
          shut(4000, "heartbeat_timeout");
        }, idleMs);
      };
      const onAbort = () => {
        // close(): end quietly; #stop already rejected what was pending and set the state.
        shut(1000, "client closed");
      };
      run.signal.addEventListener("abort", onAbort, { once: true });

      // Closes the socket and finishes at once: a dead connection's close event may take long.
      const shut = (code, reason) => {
        try {
          ws.close(code, reason);
        } catch {
          /* already closing */
        }
        finish({ code: 1006, reason: "", wasClean: false, local: true });
      };
      conn.dispose = (code, reason) => shut(code, reason);

      const finish = (closeEvent) => {
        if (ended) return;
        ended = true;
        timers();
        run.signal.removeEventListener("abort", onAbort);
        ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
        if (this.#conn === conn) this.#conn = null;
        if (run.signal.aborted) return resolve({ kind: "aborted", error: abortError() });
        const outcome = this.#classify(closeEvent, { errorFrame, reconnectFrame, localError, connected, address });
        this.#failPending(conn, "connection_lost", `the connection closed before the answer (${outcome.error.code})`);
        resolve(outcome);
      };

      ws.onmessage = (event) => {
        if (ended) return;
        if (connected) armIdle();
        const text = typeof event.data === "string" ? event.data : "";
        for (const line of batched || !connected ? text.split("\n") : [text]) {
          if (ended) return;
          onFrame(line);
        }
      };
      const onFrame = (text) => {
        let frame;
        try {
          frame = JSON.parse(text);
        } catch {
          this.#emitError(new SwitchboardError("invalid_server_frame", "the server sent a frame that is not JSON"));
          return;
        }
        if (!frame || typeof frame !== "object") return;
        switch (frame.type) {
          case "connected": {
            if (connected) return;
            connected = true;
            batched = frame.batch === true;
            clearTimeout(connectTimer);
            const pingMs = positive(frame.ping_interval_ms, DEFAULTS.pingIntervalMs);
            idleMs = positive(frame.idle_timeout_ms, DEFAULTS.idleTimeoutMs);
            conn.info = {
              uid: frame.uid,
              connId: frame.conn_id,
              nodeId: frame.node_id,
              pingIntervalMs: pingMs,
              idleTimeoutMs: idleMs,
              address,
              source,
            };
            this.#conn = conn;
            pingTimer = setInterval(() => {
              try {
                ws.send('{"type":"ping"}');
              } catch {
                /* the close event follows */
              }
            }, pingMs);
            armIdle();
            this.#setState("connected", { ...conn.info });
            this.#resubscribe(conn);
            return;
          }
          case "message":
            this.#emit("message", frame);
            return;
          case "ack":
          case "subscribed":
          case "unsubscribed":
            if (typeof frame.client_id === "string") this.#settle(frame.client_id, frame);
            return;
          case "error": {
            const err = new SwitchboardError(frame.code || "unknown_error", frame.message || frame.code, { frame, clientId: frame.client_id, fatal: frame.fatal === true });
            if (typeof frame.client_id === "string" && this.#settle(frame.client_id, err)) return;
            // A fatal error (or any error before `connected`) says why the connection is about
            // to close; the others (an answer to a request that timed out, ...) are only told.
            if (frame.fatal === true || !connected) errorFrame = frame;
            // The error that follows a `reconnect` frame is part of an orderly move, not a failure.
            if (!(reconnectFrame && (frame.code === "server_shutdown" || frame.code === "node_draining"))) {
              this.#emitError(err, { fatal: frame.fatal === true, reason: frame.reason });
            }
            return;
          }
          case "reconnect":
            reconnectFrame = frame;
            return;
          default:
            return; // pong, and frame types this client does not know
        }
      };
      ws.onerror = () => {
        /* the close event follows with what there is to know */
      };
      ws.onclose = (event) => finish({ code: event.code, reason: event.reason, wasClean: event.wasClean });
    });
  }

  /** Turns how a connection ended into what to do next. */
  #classify(closeEvent, { errorFrame, reconnectFrame, localError, connected, address }) {
    let error;
    let reported = false;
    if (localError) {
      error = localError;
    } else if (errorFrame) {
      error = new SwitchboardError(errorFrame.code || "unknown_error", errorFrame.message || errorFrame.code, { frame: errorFrame });
      reported = true;
    } else if (closeEvent.reason && CODE_SHAPE.test(closeEvent.reason)) {
      error = new SwitchboardError(closeEvent.reason, `the server closed the connection: ${closeEvent.reason} (${closeEvent.code})`);
    } else if (connected) {
      error = new SwitchboardError("connection_lost", `the connection to ${address} was lost (close code ${closeEvent.code})`);
    } else {
      error = new SwitchboardError("connect_failed", `could not connect to ${address} (close code ${closeEvent.code})`);
    }
    const outcome = { error, connected, reported };
    if (reconnectFrame) {
      outcome.kind = "retry";
      outcome.redirect = reconnectFrame;
      outcome.delayMs = positive(reconnectFrame.delay_ms, 0, true);
      // The server's orderly goodbye is no failure to report.
      outcome.reported = true;
      return outcome;
    }
    if (TERMINAL.has(error.code)) outcome.kind = "terminal";
    else if (AUTH.has(error.code) || (closeEvent.code === CLOSE_AUTH && !localError)) outcome.kind = "auth";
    else outcome.kind = "retry";
    return outcome;
  }

  /** Subscribes the new connection to every channel the client holds. */
  #resubscribe(conn) {
    for (const channel of this.#channels) {
      this.#request("subscribe", { type: "subscribe", channel }, {}).catch((e) => {
        if (this.#conn !== conn || e.code === "connection_lost" || e.code === "closed") return;
        // Refused by the server: forget the channel. Unanswered: keep it for the next connection.
        if (e.code !== "timeout") this.#channels.delete(channel);
        this.#emitError(e, { channel, fatal: false, message: `could not subscribe to ${channel} again: ${e.message}` });
      });
    }
  }
}

function positive(value, fallback, allowZero = false) {
  return typeof value === "number" && Number.isFinite(value) && (value > 0 || (allowZero && value === 0)) ? value : fallback;
}

export default SwitchboardClient;
