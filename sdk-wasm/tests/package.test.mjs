// Tests of the packed npm package (`npm pack` of sdk-wasm/pkg) as a user gets it: run by
// scripts/test-npm-package.sh with `node --test` inside a scratch project where the
// tarball was installed (`npm install ./adclick-sdk-X.Y.Z.tgz`), so every import below
// goes through the package's `exports`. A Node HTTP server plays the collector; a small
// `Storage` class plays `localStorage` and shows exactly what the tracker stores.
//
// Env: ADCLICK_EXPECT_VERSION (the workspace version the package must carry).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import http from "node:http";
import { fileURLToPath } from "node:url";

import { initSync, Tracker, trackLinks } from "@adclick/sdk";

// Shaped like a token (the SDK checks only the alphabet and length; collectors verify).
const TOKEN = "AQoQABEiM0RVZneImaq7zN3u_xAqGAcgASoyaHR0cHM6Ly9leGFtcGxlLmNvbS9sYW5kaW5n";

class Storage {
  #m = new Map();
  get length() { return this.#m.size; }
  key(i) { return [...this.#m.keys()][i] ?? null; }
  getItem(k) { return this.#m.has(k) ? this.#m.get(k) : null; }
  setItem(k, v) { this.#m.set(k, String(v)); writes += 1; }
  removeItem(k) { this.#m.delete(k); }
  clear() { this.#m.clear(); }
  keys() { return [...this.#m.keys()]; }
}
let writes = 0;
globalThis.Storage = Storage;
globalThis.localStorage = new Storage();

const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

/** A collector answering `status` and logging request bodies. */
async function collector(status = 202) {
  const log = [];
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      log.push({ url: req.url, type: req.headers["content-type"], body: Buffer.concat(chunks) });
      res.writeHead(status, { "access-control-allow-origin": "*", connection: "close" });
      res.end(status < 300 ? '{"accepted":1}' : "busy");
    });
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  const url = `http://127.0.0.1:${server.address().port}`;
  const close = () => new Promise((ok) => { server.closeAllConnections?.(); server.close(() => ok()); });
  return { url, log, close };
}

/** Clicks in a logged batch: occurrences of the token's bytes in the protobuf body. */
const clicksIn = (body) => body.toString("latin1").split(TOKEN).length - 1;

before(() => {
  // The bundler/`<script type="module">` entry fetches the .wasm next to the JS; Node's
  // fetch has no file: URLs, so read it through the package's `exports` instead.
  const wasm = fileURLToPath(import.meta.resolve("@adclick/sdk/adclick_sdk_wasm_bg.wasm"));
  initSync({ module: readFileSync(wasm) });
});

after(() => {
  globalThis.localStorage.clear();
});

test("package metadata: name, workspace version, license, types, exports", () => {
  const pkgPath = fileURLToPath(import.meta.resolve("@adclick/sdk/package.json"));
  const pkg = JSON.parse(readFileSync(pkgPath, "utf8"));
  assert.equal(pkg.name, "@adclick/sdk");
  assert.equal(pkg.version, process.env.ADCLICK_EXPECT_VERSION);
  assert.equal(pkg.license, "Apache-2.0");
  assert.equal(pkg.private, undefined, "a private package cannot be published");
  const types = readFileSync(new URL("adclick_sdk_wasm.d.ts", import.meta.resolve("@adclick/sdk")), "utf8");
  for (const needle of ["export class Tracker", "setConsent(granted: boolean): void", "consent?: boolean",
    "droppedConsent: number", "export function trackLinks", "export interface TrackerOptions"]) {
    assert.ok(types.includes(needle), `.d.ts lacks ${needle}`);
  }
  assert.equal(typeof trackLinks, "function");
});

test("default consent: stores, sends, and forgets once delivered", async () => {
  const c = await collector(202);
  globalThis.localStorage.clear();
  const t = new Tracker({ endpoint: c.url, flushIntervalMs: 60000, storageKey: "pkg1" });
  try {
    assert.equal(t.consent, "granted");
    t.click(TOKEN, { country: "US", device: "mobile" });
    assert.equal(localStorage.keys().filter((k) => k.startsWith("pkg1:")).length, 1);
    await t.flush();
    assert.equal(c.log.length, 1);
    assert.equal(c.log[0].url, "/v1/clicks");
    assert.equal(c.log[0].type, "application/x-protobuf");
    assert.equal(clicksIn(c.log[0].body), 1);
    assert.equal(localStorage.length, 0);
    assert.equal(t.stats().sent, 1);
  } finally {
    t.free();
    await c.close();
  }
});

test("consent: false holds clicks in memory only, with no storage and no request, until setConsent(true)", async () => {
  const c = await collector(202);
  globalThis.localStorage.clear();
  // A click an earlier page stored (with consent) must not even be read before consent.
  const earlier = new Tracker({ endpoint: "http://127.0.0.1:9", flushIntervalMs: 60000, storageKey: "pkg2", maxAttempts: 1 });
  earlier.click(TOKEN);
  earlier.free();
  assert.equal(localStorage.length, 1);
  const before = writes;

  const t = new Tracker({ endpoint: c.url, consent: false, flushIntervalMs: 20, storageKey: "pkg2" });
  try {
    assert.equal(t.consent, "pending");
    assert.equal(t.persistent, false);
    t.click(TOKEN, { country: "DE" });
    t.click(TOKEN);
    assert.throws(() => t.click("not a token!"), /token/); // still validated
    t.sendBeacon(); // page hide before consent: nothing leaves either
    await sleep(120); // several flush ticks
    assert.equal(c.log.length, 0, "no request before consent");
    assert.equal(writes, before, "no localStorage write before consent");
    assert.equal(localStorage.length, 1, "the earlier page's click is untouched");
    assert.equal(t.queued, 2);
    assert.equal(t.stats().held, 2);
    await assert.rejects(t.flush(), /no consent yet: 2 clicks held in memory/);

    t.setConsent(true);
    assert.equal(t.consent, "granted");
    assert.equal(t.persistent, true);
    await t.flush();
    const sent = c.log.reduce((n, r) => n + clicksIn(r.body), 0);
    assert.equal(sent, 3, "the two held clicks and the earlier page's one");
    assert.equal(localStorage.length, 0);
    assert.equal(t.stats().held, 0);
    assert.equal(t.stats().sent, 3);
  } finally {
    t.free();
    await c.close();
  }
});

test("setConsent(false) discards unsent clicks in memory and localStorage, and later clicks", async () => {
  const c = await collector(503);
  globalThis.localStorage.clear();
  const events = [];
  const t = new Tracker({
    endpoint: c.url, flushIntervalMs: 60000, storageKey: "pkg3", maxAttempts: 1,
    onEvent: (e) => events.push(e),
  });
  try {
    t.click(TOKEN);
    t.click(TOKEN);
    await assert.rejects(t.flush(), /not delivered/); // 503: the clicks stay stored
    assert.equal(localStorage.keys().filter((k) => k.startsWith("pkg3:")).length, 2);
    // Another tab's stored click of the same origin goes too: consent is the user's.
    localStorage.setItem("pkg3:v1:othertab:0", localStorage.getItem(localStorage.key(0)));
    const requests = c.log.length;

    t.setConsent(false);
    assert.equal(t.consent, "denied");
    assert.equal(localStorage.length, 0, "stored clicks deleted");
    assert.equal(t.queued, 0);
    assert.equal(t.stats().droppedConsent, 2);
    assert.deepEqual(events.at(-1), { type: "dropped", clicks: 2, reason: "consent" });
    t.click(TOKEN); // discarded, not stored, not an error
    assert.equal(localStorage.length, 0);
    assert.equal(t.stats().droppedConsent, 3);
    await t.flush(); // nothing to send
    t.sendBeacon();
    await sleep(50);
    assert.equal(c.log.length, requests, "no request after withdrawal");

    // Consent can be given again: new clicks are stored and sent.
    t.setConsent(true);
    t.click(TOKEN);
    assert.equal(localStorage.length, 1);
  } finally {
    t.free();
    await c.close();
  }
});

test("first-party endpoint: a same-origin path is accepted, a protocol-relative URL is not", () => {
  const t = new Tracker({ endpoint: "/adclick", consent: false });
  t.free();
  assert.throws(() => new Tracker({ endpoint: "//collector.example" }), /invalid endpoint/);
  assert.throws(() => new Tracker({ endpoint: "/adclick", consent: "yes" }), /`consent` must be a boolean/);
});
