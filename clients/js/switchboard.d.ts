// Type declarations for switchboard.js, the browser client of the switchboard gateway.
// The wire protocol is docs/protocol.md in the gateway's repository.

/** Client states, in the order of a normal start. */
export type State = "idle" | "routing" | "connecting" | "connected" | "reconnecting" | "closed";

export declare const STATES: readonly State[];

/** Server error codes caused by the credentials (a `token` function gets a fresh token). */
export declare const AUTH_ERROR_CODES: readonly string[];

/** Server error codes after which the client stops (state `closed`) whatever the token. */
export declare const TERMINAL_ERROR_CODES: readonly string[];

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** What the `token` function is told about the attempt it is called for. */
export interface TokenContext {
  /** 1 for the first attempt of a connect(), then 2, 3, ... */
  attempt: number;
  /** The error code that ended the previous attempt (e.g. `token_expired`), if any. */
  reason?: string;
}

/**
 * A token, or a function returning one (called before every connection attempt). A function
 * that throws is retried with backoff, unless what it throws has `fatal: true`: then the
 * client stops, reporting the thrown `code` (or `token_failed`).
 */
export type TokenSource = string | ((context: TokenContext) => string | Promise<string>);

export interface BackoffOptions {
  /** Delay cap of the first retry, in ms. Default 500. */
  initialDelayMs?: number;
  /** Largest delay, in ms. Default 30000. */
  maxDelayMs?: number;
  /** Growth of the cap per failed attempt. Default 2. */
  multiplier?: number;
  /**
   * How much of the delay is random, from 0 (none: exactly the capped exponential) to 1
   * (full jitter: uniformly between 0 and the capped exponential). Default 1.
   */
  jitter?: number;
}

/**
 * What the client needs of a WebSocket (the browser's fits). The client sets the four
 * handlers; `onmessage` gets `{data: string}`, `onclose` gets `{code, reason, wasClean}`.
 */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => any) | null;
  onmessage: ((event: any) => any) | null;
  onerror: ((event: any) => any) | null;
  onclose: ((event: any) => any) | null;
}

export interface SwitchboardOptions extends BackoffOptions {
  /**
   * Base URL of the gateway's HTTP(S) API, where `GET /route` is asked (e.g.
   * `https://im.example.com`). Default: `location.origin` in a page.
   */
  server?: string;
  /** The app id (`[apps.<id>]` in the gateway's config). */
  appId: string;
  /** The user id, sent to `/route` so that the user's node is chosen. */
  uid?: string;
  /** The client token (an HS256 JWT unless the app has its own authenticator). */
  token: TokenSource;
  /** Backoff settings; the same keys may also be given at the top level. */
  backoff?: BackoffOptions;
  /** Reconnect after the connection is lost. Default true; false: stop (`closed`) instead. */
  reconnect?: boolean;
  /** From opening the WebSocket to its `connected` frame, and for `GET /route`, in ms. Default 15000. */
  connectTimeoutMs?: number;
  /** How long send/subscribe/unsubscribe/publish wait for their answer, in ms. Default 10000. */
  requestTimeoutMs?: number;
  /** How many fresh tokens in a row the server may refuse before the client stops. Default 3. */
  maxAuthRetries?: number;
  /** The WebSocket constructor to use. Default: the global `WebSocket`. */
  WebSocket?: new (url: string) => WebSocketLike;
  /** The fetch function to use for `/route`. Default: the global `fetch`. */
  fetch?: (input: string, init?: any) => Promise<{ ok: boolean; status: number; json(): Promise<any> }>;
  /** Random numbers in [0, 1) for the jitter and client ids (for tests). Default `Math.random`. */
  random?: () => number;
}

/** Per-request options. */
export interface RequestOptions {
  /** Overrides `requestTimeoutMs`; 0 or Infinity waits without a time limit. */
  timeoutMs?: number;
}

/**
 * What `send` and `publish` resolve with under `{ack: false}`: the frame's client id, which
 * an `error` event carries if the server refuses the message.
 */
export interface Unacknowledged {
  client_id: string;
}

/** An answer from `GET /route`. */
export interface RouteAnswer {
  tcp_addr: string;
  ws_addr: string;
  wss_addr: string;
  [key: string]: unknown;
}

/** The server's `message` frame: a message for this user, or for a channel it subscribed to. */
export interface MessageFrame {
  type: "message";
  /** Sender's user id; "" when pushed by the app server without a `from`. */
  from: string;
  /** The recipient user id, or the channel. */
  to: string;
  /** Present on channel messages. */
  channel?: string;
  /** 1 = direct message, 2 = channel message. */
  event: number;
  data: Json;
  msg_id: string;
  /** Milliseconds since the epoch. */
  send_at: number;
  conversation_id: string;
  [key: string]: unknown;
}

/** The server's answer to `send` and `publish`. */
export interface AckFrame {
  type: "ack";
  client_id: string;
  msg_id: string;
  status: "delivered" | "dropped" | "offline" | "unavailable" | string;
  /** Connections the message was handed to (subscriber connections for a channel). */
  delivered: number;
  dropped?: number;
  cluster?: string;
  [key: string]: unknown;
}

export interface SubscribedFrame {
  type: "subscribed";
  channel: string;
  client_id: string;
}

export interface UnsubscribedFrame {
  type: "unsubscribed";
  channel: string;
  client_id?: string;
  /** true when the client was not connected and only forgot the channel. */
  local?: boolean;
  /** With `local`: whether the channel was among the client's subscriptions. */
  subscribed?: boolean;
}

/** The server's `error` frame. */
export interface ErrorFrame {
  type: "error";
  code: string;
  message: string;
  client_id?: string;
  reason?: string;
  fatal?: boolean;
}

/** What the `connected` frame said, and where the client connected. */
export interface ConnectionInfo {
  uid: string;
  connId: string;
  nodeId: string;
  pingIntervalMs: number;
  idleTimeoutMs: number;
  /** The WebSocket address (`ws://host:port` or `wss://...`). */
  address: string;
  /** Whether the address came from `/route` or from the server's `reconnect` frame. */
  source: "route" | "reconnect";
}

export interface ErrorInfo {
  code: string;
  message: string;
}

/** `detail` of the `state` event. Which extra fields are present depends on the state. */
export interface StateDetail {
  state: State;
  previous: State;
  /** routing, connecting, reconnecting: the attempt number (since connect()). */
  attempt?: number;
  /** connecting, connected: the WebSocket address chosen. */
  address?: string;
  /** connecting, connected. */
  source?: "route" | "reconnect";
  /** connecting, when the address came from /route: its answer. */
  route?: RouteAnswer;
  /** reconnecting: the wait before the next attempt, in ms. */
  delayMs?: number;
  /** reconnecting, closed: why the previous connection or attempt ended. */
  reason?: ErrorInfo;
  /** reconnecting after a `reconnect` frame: the addresses it gave. */
  redirect?: { ws_addr: string; wss_addr: string };
  /** connected: as in ConnectionInfo. */
  uid?: string;
  connId?: string;
  nodeId?: string;
  pingIntervalMs?: number;
  idleTimeoutMs?: number;
}

/** `detail` of the `error` event. */
export interface ErrorDetail {
  /**
   * The server's error code, or one of the client's: `route_failed`, `no_address`,
   * `token_failed`, `connect_failed`, `connect_timeout`, `connection_lost`,
   * `heartbeat_timeout`, `invalid_server_frame`, `closed`.
   */
  code: string;
  message: string;
  /** true when the connection ends (server errors), or the client stops (its own). */
  fatal?: boolean;
  /** The server's error frame, when there is one. */
  frame?: ErrorFrame;
  /** `auth_rejected`: the authenticator plugin's own code. */
  reason?: string;
  /** HTTP status, for `/route` failures. */
  status?: number;
  /** A channel that could not be subscribed to again after a reconnect. */
  channel?: string;
  /** The `client_id` of the frame the error answers, when no request waits for it. */
  clientId?: string;
}

export interface SwitchboardEventMap {
  state: CustomEvent<StateDetail>;
  message: CustomEvent<MessageFrame>;
  error: CustomEvent<ErrorDetail>;
}

export interface SwitchboardDetailMap {
  state: StateDetail;
  message: MessageFrame;
  error: ErrorDetail;
}

/** An error with a stable `code` (the server's error code, or one of the client's own). */
export declare class SwitchboardError extends Error {
  constructor(
    code: string,
    message?: string,
    extra?: { frame?: ErrorFrame; clientId?: string; cause?: unknown; status?: number; fatal?: boolean },
  );
  readonly name: "SwitchboardError";
  /**
   * The server's code (e.g. `invalid_recipient`, `rate_limited`, `token_expired`), or the
   * client's: `not_connected`, `connection_lost`, `timeout`, `closed`, `invalid_data`, ...
   */
  code: string;
  /** The server's error frame, when the server answered with one. */
  frame?: ErrorFrame;
  /** The request's client_id, for request errors. */
  clientId?: string;
  /** HTTP status, for `/route` failures. */
  status?: number;
  fatal?: boolean;
}

export declare class SwitchboardClient extends EventTarget {
  constructor(options: SwitchboardOptions);

  /** The current state. */
  readonly state: State;
  /** The live connection; null unless the state is `connected`. */
  readonly connection: ConnectionInfo | null;
  /** The channels subscribed to (confirmed by the server); subscribed again on reconnect. */
  readonly channels: string[];
  /** The route server's base URL in use. */
  readonly server: string;
  /** Whether only `wss:` addresses may be used (the page or `server` is https:). */
  readonly secure: boolean;

  /**
   * Starts connecting (from `idle` or `closed`). Resolves once connected; rejects with a
   * SwitchboardError if the client stops first. Reconnecting goes on after it settled.
   */
  connect(): Promise<void>;
  /** Closes the connection and stops reconnecting; pending requests reject with `closed`. */
  close(): void;

  /** Sends `data` to user `to`; resolves with the ack. */
  send(to: string, data: Json, options: RequestOptions & { ack: false }): Promise<Unacknowledged>;
  send(to: string, data: Json, options?: RequestOptions & { ack?: true }): Promise<AckFrame>;
  /** Subscribes to `channel` (kept across reconnects); resolves with the `subscribed` frame. */
  subscribe(channel: string, options?: RequestOptions): Promise<SubscribedFrame>;
  /** Unsubscribes from `channel`; resolves with the `unsubscribed` frame. */
  unsubscribe(channel: string, options?: RequestOptions): Promise<UnsubscribedFrame>;
  /** Publishes `data` to `channel` (the app needs `client_publish = true`); resolves with the ack. */
  publish(channel: string, data: Json, options: RequestOptions & { ack: false }): Promise<Unacknowledged>;
  publish(channel: string, data: Json, options?: RequestOptions & { ack?: true }): Promise<AckFrame>;

  /** Adds `listener(detail)` for an event; returns a function that removes it. */
  on<K extends keyof SwitchboardDetailMap>(type: K, listener: (detail: SwitchboardDetailMap[K]) => void): () => void;

  addEventListener<K extends keyof SwitchboardEventMap>(
    type: K,
    listener: (this: SwitchboardClient, event: SwitchboardEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof SwitchboardEventMap>(
    type: K,
    listener: (this: SwitchboardClient, event: SwitchboardEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}

/**
 * The WebSocket address to use from a route answer or `reconnect` frame: `wss_addr` when
 * `secure`, else `ws_addr` or, when that is empty, `wss_addr`. "" when none fits.
 */
export declare function chooseAddress(addrs: { ws_addr?: string; wss_addr?: string }, secure: boolean): string;

/** The reconnect delay after `failures` failed attempts (0: the first retry), in ms. */
export declare function backoffDelay(
  failures: number,
  options: Required<Pick<BackoffOptions, "initialDelayMs" | "maxDelayMs" | "multiplier" | "jitter">>,
  random?: () => number,
): number;

export default SwitchboardClient;
