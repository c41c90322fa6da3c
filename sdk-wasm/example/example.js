// adclick example publisher page (see index.html for how to run it).
// Loads the SDK, creates a Tracker for the collector, renders one ad link per token and
// lets trackLinks() track clicks on them. Only demo code: no SDK logic lives here.
import init, { Tracker, trackLinks } from "../pkg/adclick_sdk_wasm.js";

const params = new URLSearchParams(location.search);
const endpoint = params.get("endpoint") || "http://127.0.0.1:8080";
const tokens = (params.get("tokens") || "").split(/[\s,]+/).filter(Boolean);

const $ = (id) => document.getElementById(id);
$("endpoint").textContent = endpoint;
$("tokens").value = tokens.join("\n");

// Pasted tokens go into the query string, so they survive the link navigations.
$("tokens-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const next = new URLSearchParams(params);
  next.set("tokens", $("tokens").value.split(/\s+/).filter(Boolean).join(","));
  next.delete("clicked");
  location.search = next.toString();
});

const events = [];
function logEvent(text) {
  events.unshift(`${new Date().toLocaleTimeString()}  ${text}`);
  events.length = Math.min(events.length, 30);
  $("events").textContent = events.join("\n");
}

await init();

const tracker = new Tracker({
  endpoint,
  batchSize: 20,
  flushIntervalMs: 2000,
  onEvent: (e) => logEvent(JSON.stringify(e)),
});
trackLinks(tracker, document, {
  device: matchMedia("(pointer: coarse)").matches ? "mobile" : "desktop",
});
if (tracker.stats().restored > 0) {
  logEvent(`restored ${tracker.stats().restored} unsent clicks from localStorage`);
}
if (params.has("clicked")) {
  logEvent(`arrived from a click on ad #${params.get("clicked")}`);
}

// One link per token; each leads back here (with ?clicked=N) so the navigation is real.
const ads = $("ads");
if (tokens.length > 0) {
  ads.replaceChildren();
  tokens.forEach((token, i) => {
    const a = document.createElement("a");
    a.className = "ad";
    a.dataset.adclickToken = token;
    const next = new URLSearchParams(params);
    next.set("clicked", String(i + 1));
    a.href = `?${next}`;
    a.textContent = `Ad #${i + 1}: token ${token.slice(0, 16)}…`;
    ads.append(a);
  });
}

$("flush").addEventListener("click", () => {
  tracker.flush().then(
    () => logEvent("flush: everything delivered"),
    (err) => logEvent(`flush: ${err.message}`),
  );
});

function renderStats() {
  $("stats").textContent = JSON.stringify(
    { ...tracker.stats(), persistent: tracker.persistent },
    null,
    1,
  );
}
renderStats();
setInterval(renderStats, 500);
