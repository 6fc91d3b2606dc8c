// End-to-end tests of the demo page (/demo) and the browser client (clients/js/switchboard.js)
// in a real Chromium, against a real switchboard process.
//
//   cd tests/browser && npm ci                      # playwright-core only; never a browser download
//   SWITCHBOARD_BIN=$PWD/target/debug/switchboard node --test tests/browser/*.test.mjs
//
// Needs: SWITCHBOARD_BIN (absolute path of the binary), Debian's Chromium at /usr/bin/chromium
// (`apt-get install chromium`; another path with CHROMIUM_PATH). Each suite starts its own
// gateway in a fresh temp dir, on fixed ports picked free at the start (so that it can be
// restarted on the same ports), and stops it with SIGTERM.
//
// Writes target/browser/demo.png (a screenshot mid-conversation), and on a failure
// target/browser/failure-*.png; the failure message ends with the gateway's stderr and each
// page's state, last error and console.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "../..");
const OUT = path.join(REPO, "target", "browser");
const BIN = process.env.SWITCHBOARD_BIN;
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";

/** How long one expected thing (a page state, a message, an ack) may take. */
const WAIT = 15_000;
/** How long a page may take to come back after the gateway restarted. */
const RECONNECT_WAIT = 45_000;
/** From spawn to the "switchboard listening" line. */
const START_WAIT = 20_000;
/** From SIGTERM to exit, before SIGKILL. */
const STOP_WAIT = 15_000;

const APP = "demo";
const SECRET = "browser-test-secret-0123456789abcdef";

// ------------------------------------------------------------------------------------------
// The gateway process

/** Ports the OS says are free now: all held open at once so that they differ, then closed. */
async function freePorts(n) {
  const servers = [];
  try {
    for (let i = 0; i < n; i++) {
      const server = net.createServer();
      await new Promise((resolve, reject) => {
        server.once("error", reject);
        server.listen(0, "127.0.0.1", resolve);
      });
      servers.push(server);
    }
    return servers.map((s) => s.address().port);
  } finally {
    await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
  }
}

function configText({ ports, tls }) {
  const lines = [
    "# Written by tests/browser/demo.test.mjs",
    "[node]",
    'id = "browser-test"',
    'data_dir = "data"',
    "[node.external]",
    'host = "127.0.0.1"',
    "[listeners.http]",
    `bind = "127.0.0.1:${ports.http}"`,
    "[listeners.ws]",
    `bind = "127.0.0.1:${ports.ws}"`,
    "[listeners.tcp]",
    `bind = "127.0.0.1:${ports.tcp}"`,
  ];
  if (tls) {
    lines.push(
      "[listeners.https]",
      `bind = "127.0.0.1:${ports.https}"`,
      "[listeners.wss]",
      `bind = "127.0.0.1:${ports.wss}"`,
      "[tls]",
      'cert = "certs/dev.crt"',
      'key = "certs/dev.key"',
    );
  }
  lines.push(
    "[shutdown]",
    'grace = "5s"',
    'reconnect_jitter = "500ms"',
    "[limits]",
    "messages_per_second = 1000",
    "message_burst = 1000",
    "[demo]",
    "enabled = true",
    `[apps.${APP}]`,
    `secret = "${SECRET}"`,
    "dev_tokens = true",
    "client_publish = true",
    "",
  );
  return lines.join("\n");
}

const ANSI = /\x1b\[[0-9;]*m/g;

/** One switchboard process at a time, restartable on the same ports. */
class Gateway {
  constructor({ tls = false } = {}) {
    this.tls = tls;
    this.dir = null;
    this.configPath = null;
    this.ports = null;
    this.proc = null;
    this.log = []; // output lines of every run, the latest last
  }

  /** Creates the temp dir, the certificate (TLS) and the config; starts the process. */
  async setup() {
    this.dir = await mkdtemp(path.join(os.tmpdir(), "switchboard-browser-"));
    const [http, ws, tcp, https, wss] = await freePorts(5);
    this.ports = { http, ws, tcp, https, wss };
    if (this.tls) {
      const out = await run(BIN, ["cert", "--host", "127.0.0.1", "--out", path.join(this.dir, "certs")], {
        cwd: this.dir,
      });
      for (const f of ["dev.crt", "dev.key"]) {
        assert.ok(existsSync(path.join(this.dir, "certs", f)), `\`switchboard cert\` did not write certs/${f}:\n${out}`);
      }
    }
    this.configPath = path.join(this.dir, "switchboard.toml");
    await writeFile(this.configPath, configText({ ports: this.ports, tls: this.tls }));
    await this.start();
  }

  get http() {
    return `http://127.0.0.1:${this.ports.http}`;
  }

  get https() {
    return `https://127.0.0.1:${this.ports.https}`;
  }

  /** Spawns `switchboard serve` and waits for its "switchboard listening" line. */
  async start() {
    assert.equal(this.proc, null, "the gateway is already running");
    // A port of the previous run may still be held for a moment: retry a bind failure.
    for (let tries = 1; ; tries++) {
      try {
        return await this.#spawn();
      } catch (e) {
        if (tries >= 10 || !/address (already )?in use|os error 98/i.test(e.message)) throw e;
        await delay(500);
      }
    }
  }

  #spawn() {
    this.log.push(`----- starting ${BIN} -c ${this.configPath} serve`);
    const proc = spawn(BIN, ["-c", this.configPath, "serve"], {
      cwd: this.dir,
      env: { ...process.env, RUST_LOG: "info", NO_COLOR: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.proc = proc;
    proc.exited = new Promise((resolve) => proc.once("exit", (code, signal) => resolve({ code, signal })));
    proc.exited.then(({ code, signal }) => {
      this.log.push(`----- exited (code ${code}, signal ${signal})`);
      if (this.proc === proc) this.proc = null;
    });
    return new Promise((resolve, reject) => {
      let ready = false;
      const timer = setTimeout(() => {
        reject(new Error(`the gateway did not log "switchboard listening" within ${START_WAIT} ms\n${this.tail()}`));
        proc.kill("SIGKILL");
      }, START_WAIT);
      const onLine = (line) => {
        this.log.push(line);
        if (this.log.length > 2000) this.log.splice(0, this.log.length - 1000);
        if (!ready && line.includes("switchboard listening")) {
          ready = true;
          clearTimeout(timer);
          resolve();
        }
      };
      for (const stream of [proc.stdout, proc.stderr]) {
        let buffered = "";
        stream.setEncoding("utf8");
        stream.on("data", (chunk) => {
          buffered += chunk;
          const lines = buffered.split("\n");
          buffered = lines.pop();
          for (const l of lines) onLine(l.replace(ANSI, ""));
        });
      }
      proc.once("error", (e) => {
        clearTimeout(timer);
        reject(new Error(`cannot start ${BIN}: ${e.message}`));
      });
      proc.exited.then(({ code, signal }) => {
        if (ready) return;
        clearTimeout(timer);
        reject(new Error(`the gateway exited (code ${code}, signal ${signal}) before it was ready\n${this.tail()}`));
      });
    });
  }

  /** SIGTERM, then waits for the exit (SIGKILL after STOP_WAIT). Resolves with how it ended. */
  async stop() {
    const proc = this.proc;
    if (!proc) return null;
    proc.kill("SIGTERM");
    const timer = setTimeout(() => {
      this.log.push(`----- no exit within ${STOP_WAIT} ms of SIGTERM: SIGKILL`);
      proc.kill("SIGKILL");
    }, STOP_WAIT);
    const ended = await proc.exited;
    clearTimeout(timer);
    return ended;
  }

  async teardown() {
    await this.stop();
    if (this.dir && !process.env.KEEP_TMP) await rm(this.dir, { recursive: true, force: true });
  }

  /** The last lines the gateway wrote, for failure messages. */
  tail(n = 60) {
    return `--- gateway output (last ${n} lines) ---\n${this.log.slice(-n).join("\n")}`;
  }

  /** `switchboard push` with this gateway's config; resolves with its output. */
  push(to, message) {
    return run(BIN, ["-c", this.configPath, "push", "--app", APP, "--to", to, "--message", JSON.stringify(message)], {
      cwd: this.dir,
    });
  }
}

/** Runs a command to its end (15 s at most); resolves with stdout+stderr, rejects on failure. */
function run(file, args, { cwd }) {
  return new Promise((resolve, reject) => {
    execFile(file, args, { cwd, timeout: 15_000, env: { ...process.env, NO_COLOR: "1" } }, (error, stdout, stderr) => {
      const output = `${stdout}${stderr}`;
      if (error) reject(new Error(`${path.basename(file)} ${args.join(" ")} failed: ${error.message}\n${output}`));
      else resolve(output);
    });
  });
}

function delay(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ------------------------------------------------------------------------------------------
// The browser and the demo page

let browser = null;
/** Gateways alive, to kill if the test process dies first. */
const live = new Set();
process.once("exit", () => {
  for (const g of live) g.proc?.kill("SIGKILL");
});

before(async () => {
  assert.ok(
    BIN && path.isAbsolute(BIN) && existsSync(BIN),
    `set SWITCHBOARD_BIN to the absolute path of the switchboard binary (e.g. ${REPO}/target/debug/switchboard); got ${JSON.stringify(BIN)}`,
  );
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: apt-get install chromium (or set CHROMIUM_PATH)`);
  await mkdir(OUT, { recursive: true });
  for (const f of await readdir(OUT)) {
    if (f.startsWith("failure-") && f.endsWith(".png")) await rm(path.join(OUT, f), { force: true });
  }
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--no-first-run",
      "--disable-sync",
      // The TLS suite's gateway has a self-signed certificate: for wss:// as well as https://.
      "--ignore-certificate-errors",
    ],
  });
});

after(async () => {
  await browser?.close();
});

/**
 * Runs `body` with a fresh browser context; on failure, rethrows with the gateway's output,
 * every page's state, and a screenshot of each page in target/browser/.
 */
async function scenario(name, gateway, body) {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 820 } });
  const pages = [];
  const open = (base, uid) => openDemo(context, base, uid, pages);
  try {
    await body({ open, pages });
  } catch (error) {
    const report = [];
    for (const [i, p] of pages.entries()) report.push(await describePage(p, `${name}-${i}`));
    error.message = `${error.message}\n\n${report.join("\n\n")}\n\n${gateway.tail()}`;
    throw error;
  } finally {
    await context.close();
  }
}

async function describePage(page, label) {
  const text = async (id) =>
    page
      .getByTestId(id)
      .innerText({ timeout: 1000 })
      .catch(() => "?");
  // One line per entry: "time state detail" / "meta text".
  const lines = async (id) =>
    page
      .locator(`[data-testid="${id}"] > li`)
      .evaluateAll((items) =>
        items.map((li) => [...li.children].map((c) => c.textContent.trim()).join("  ")),
      )
      .catch((e) => [`? ${e.message}`]);
  const file = path.join(OUT, `failure-${label.replace(/[^a-z0-9-]+/gi, "-")}.png`);
  await page.screenshot({ path: file, fullPage: true, timeout: 5000 }).catch(() => {});
  return [
    `--- page ${page.uid} (${page.url()}) screenshot ${file}`,
    `state: ${await text("state")} | address: ${await text("address")} | last error: ${await text("last-error")}`,
    `state history:\n  ${(await lines("state-history")).slice(-40).join("\n  ")}`,
    `message log:\n  ${(await lines("message-log")).slice(-20).join("\n  ")}`,
    `console:\n  ${page.consoleLines.slice(-30).join("\n  ")}`,
  ].join("\n");
}

/** Opens /demo, connects as `uid` through the UI and waits for `connected`. */
async function openDemo(context, base, uid, pages) {
  const page = await context.newPage();
  page.uid = uid;
  page.consoleLines = [];
  page.pageErrors = [];
  page.on("console", (m) => page.consoleLines.push(`[${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => {
    page.pageErrors.push(e);
    page.consoleLines.push(`[pageerror] ${e.stack || e.message}`);
  });
  pages.push(page);
  await page.goto(`${base}/demo`, { timeout: WAIT });
  await page.locator('body[data-ready="true"]').waitFor({ timeout: WAIT });
  await page.getByTestId("app-select").selectOption(APP, { timeout: WAIT });
  await page.getByTestId("uid-input").fill(uid);
  await page.getByTestId("connect-button").click();
  await waitState(page, "connected");
  return page;
}

async function waitState(page, state, timeout = WAIT) {
  await page.locator(`[data-testid="state"][data-state="${state}"]`).waitFor({ timeout });
}

async function chat(page, to, text) {
  await page.getByTestId("to-input").fill(to);
  await page.getByTestId("message-input").fill(text);
  await page.getByTestId("send-button").click({ timeout: WAIT });
}

/** Waits until `page` shows a received message containing `text`; returns its element. */
async function received(page, text) {
  const item = page.getByTestId("message-log").getByTestId("received-message").filter({ hasText: text });
  await item.first().waitFor({ timeout: WAIT });
  return item.first();
}

/** Waits until the message `text` that `page` sent is acknowledged, and checks it was delivered. */
async function acknowledged(page, text) {
  const item = page.getByTestId("message-log").getByTestId("sent-message").filter({ hasText: text }).first();
  const answered = page
    .locator('[data-testid="message-log"] > [data-testid="sent-message"]:not([data-status="pending"])')
    .filter({ hasText: text });
  await answered.first().waitFor({ timeout: WAIT });
  const status = await item.getAttribute("data-status");
  const delivery = await item.getByTestId("delivery").innerText();
  assert.equal(status, "delivered", `"${text}" sent by ${page.uid} was not delivered: ${delivery}`);
  assert.match(delivery, /delivered/);
}

/** alice and bob chat both ways; each sees the other's message and its own acknowledged. */
async function chatBothWays(alice, bob, tag) {
  await chat(alice, "bob", `hello bob, alice here ${tag}`);
  await received(bob, `hello bob, alice here ${tag}`);
  await acknowledged(alice, `hello bob, alice here ${tag}`);
  await chat(bob, "alice", `hi alice, bob here ${tag}`);
  await received(alice, `hi alice, bob here ${tag}`);
  await acknowledged(bob, `hi alice, bob here ${tag}`);
}

function assertNoPageErrors(pages) {
  for (const p of pages) {
    assert.deepEqual(
      p.pageErrors.map((e) => e.message),
      [],
      `uncaught errors in ${p.uid}'s page`,
    );
  }
}

/** A gateway started before the enclosing suite's tests and stopped after them. */
function gatewayForSuite(options) {
  const gateway = new Gateway(options);
  before(async () => {
    live.add(gateway);
    await gateway.setup();
  });
  after(async () => {
    await gateway.teardown();
    live.delete(gateway);
  });
  return gateway;
}

// ------------------------------------------------------------------------------------------
// The same scenarios over HTTP + WS and over HTTPS + WSS (a generated self-signed certificate).

const transports = [
  { name: "HTTP and WS", tls: false, page: (g) => g.http, address: (g) => `ws://127.0.0.1:${g.ports.ws}` },
  { name: "HTTPS and WSS", tls: true, page: (g) => g.https, address: (g) => `wss://127.0.0.1:${g.ports.wss}` },
];

for (const t of transports) {
  describe(`demo page over ${t.name}`, () => {
    const gateway = gatewayForSuite({ tls: t.tls });
    const tag = t.tls ? "(wss)" : "(ws)";

    test("two users chat both ways, and each sent message is acknowledged as delivered", { timeout: 90_000 }, () =>
      scenario(`chat${t.tls ? "-tls" : ""}`, gateway, async ({ open, pages }) => {
        const alice = await open(t.page(gateway), "alice");
        const bob = await open(t.page(gateway), "bob");
        for (const p of [alice, bob]) {
          assert.ok(p.url().startsWith(t.tls ? "https://" : "http://"), p.url());
          const address = await p.getByTestId("address").innerText();
          assert.equal(address, t.address(gateway), `${p.uid}'s page chose ${address}`);
        }
        await chatBothWays(alice, bob, tag);
        // The received message says who sent it.
        const item = await received(bob, `hello bob, alice here ${tag}`);
        assert.equal(await item.getAttribute("data-from"), "alice");
        assertNoPageErrors(pages);
      }));

    test("a message pushed through the HTTP API appears in the page", { timeout: 90_000 }, () =>
      scenario(`push${t.tls ? "-tls" : ""}`, gateway, async ({ open }) => {
        const alice = await open(t.page(gateway), "alice");
        const output = await gateway.push("alice", { text: `from the server ${tag}` });
        assert.match(output, /alice\s+delivered/, `push output:\n${output}`);
        const item = await received(alice, `from the server ${tag}`);
        assert.equal(await item.getAttribute("data-from"), "", "a push without --from has an empty sender");
      }));

    test("the page reconnects by itself after the gateway restarts", { timeout: 150_000 }, () =>
      scenario(`restart${t.tls ? "-tls" : ""}`, gateway, async ({ open }) => {
        const alice = await open(t.page(gateway), "alice");
        const bob = await open(t.page(gateway), "bob");
        const reconnecting = (p) => p.locator('[data-testid="state-history"] > [data-state="reconnecting"]');
        const connectedCount = async (p) =>
          p.locator('[data-testid="state-history"] > [data-state="connected"]').count();
        assert.equal(await reconnecting(alice).count(), 0);
        const before = { alice: await connectedCount(alice), bob: await connectedCount(bob) };

        const ended = await gateway.stop();
        assert.ok(ended && ended.signal !== "SIGKILL", `the gateway did not stop on SIGTERM: ${JSON.stringify(ended)}`);
        for (const p of [alice, bob]) {
          await reconnecting(p).first().waitFor({ timeout: WAIT });
          // The gateway said goodbye with a reconnect frame, which the client obeyed.
          assert.match(await reconnecting(p).first().innerText(), /server_shutdown/);
        }

        await gateway.start();
        for (const p of [alice, bob]) {
          await waitState(p, "connected", RECONNECT_WAIT);
          assert.ok((await connectedCount(p)) > before[p.uid], `${p.uid}'s page shows no new connection`);
        }
        await chatBothWays(alice, bob, `(after the restart) ${tag}`);
      }));

    if (!t.tls) {
      test("a screenshot of the demo page mid-conversation", { timeout: 90_000 }, () =>
        scenario("screenshot", gateway, async ({ open }) => {
          const alice = await open(gateway.http, "alice");
          const bob = await open(gateway.http, "bob");
          await chat(alice, "bob", "Hi Bob! Are you joining the stand-up?");
          await received(bob, "joining the stand-up");
          await chat(bob, "alice", "Yes, in two minutes. Can you share the link?");
          await received(alice, "share the link");
          await chat(alice, "bob", "Sent it in #room:lobby");
          await received(bob, "Sent it in");
          await acknowledged(alice, "Sent it in");
          const file = path.join(OUT, "demo.png");
          await alice.screenshot({ path: file, fullPage: true });
          assert.ok(existsSync(file), `no screenshot at ${file}`);
        }));
    }
  });
}
