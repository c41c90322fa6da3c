// Smoke test of a built browser-SDK package under Node: instantiates the .wasm with the
// generated JS glue, creates a Tracker, queues a click, and checks that a bad click
// throws an Error. scripts/build-wasm.sh runs it to reject an optimiser output that
// does not work. Usage: node scripts/wasm-smoke.mjs sdk-wasm/pkg
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";

const dir = resolve(process.argv[2] ?? "sdk-wasm/pkg");
const sdk = await import(pathToFileURL(`${dir}/adclick_sdk_wasm.js`).href);
sdk.initSync({ module: readFileSync(`${dir}/adclick_sdk_wasm_bg.wasm`) });
const tracker = new sdk.Tracker({ endpoint: "http://127.0.0.1:9", persist: false, flushIntervalMs: 3600000 });
tracker.click("AQ_smoke-token", { country: "us", device: "mobile" });
let threw = null;
try {
  tracker.click("not a token");
} catch (e) {
  threw = e;
}
if (tracker.queued !== 1 || !(threw instanceof Error) || !threw.message.includes("invalid token")) {
  console.error("smoke test failed", { queued: tracker.queued, threw });
  process.exit(1);
}
tracker.free();
console.log("smoke test passed: Tracker created, click queued, invalid click threw:", threw.message);
