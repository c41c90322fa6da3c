// The adclick dashboard (/ui): the query API's own endpoints, read with the API key the
// user enters (kept in sessionStorage, this tab only). No build step, no network beyond
// this server: uPlot is vendored (aggregator/ui/vendor/uplot).
"use strict";

const KEY = "adclick.apiKey";
const WINDOW_MINUTES = 60;
const TOP_N = 10;
const CHART_ADS = 5;
const $ = (s) => document.querySelector(s);
const state = { key: sessionStorage.getItem(KEY), selected: null, adWatch: null, topWatch: null,
                topCharted: "", chartTop: null, chartAd: null, lastTopFetch: 0 };

function showError(msg) { $("#error").textContent = msg || ""; }
function headers() { return { authorization: "Bearer " + state.key }; }
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Server-Sent Events over fetch: EventSource cannot send an Authorization header.
// Reconnects after a dropped stream; stops for good on 400/401 (retrying cannot help).
function watch(path, onUpdate) {
  const ctrl = new AbortController();
  (async () => {
    while (!ctrl.signal.aborted) {
      try {
        const r = await fetch(path, { headers: headers(), signal: ctrl.signal });
        if (!r.ok) {
          const p = await r.json().catch(() => ({}));
          showError(`${r.status} ${p.detail || r.statusText}`);
          if (r.status === 401) { forget(); return; }
          if (r.status === 400) return;
        } else {
          const reader = r.body.getReader();
          const dec = new TextDecoder();
          let buf = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buf += dec.decode(value, { stream: true });
            let i;
            while ((i = buf.indexOf("\n\n")) >= 0) {
              const ev = buf.slice(0, i);
              buf = buf.slice(i + 2);
              let type = "message", data = "";
              for (const line of ev.split("\n")) {
                if (line.startsWith("event: ")) type = line.slice(7);
                else if (line.startsWith("data: ")) data += line.slice(6);
              }
              if (!data) continue; // a heartbeat comment
              const v = JSON.parse(data);
              if (type === "update") { showError(""); onUpdate(v); }
              else if (type === "error") showError(`${v.status} ${v.detail}`);
            }
          }
        }
      } catch (e) {
        if (ctrl.signal.aborted) return;
        showError(String(e));
      }
      await sleep(2000);
    }
  })();
  return ctrl;
}

function fmtTime(ms) { return new Date(ms).toISOString().replace(".000Z", "Z"); }

function chart(el, title, series, data) {
  const width = Math.max(300, el.clientWidth || 600);
  const opts = { title, width, height: 220, series: [{}].concat(series.map((label, i) => ({
    label, stroke: ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"][i % 5], width: 2 }))),
    axes: [{}, { label: "clicks" }] };
  el.textContent = "";
  return new uPlot(opts, data, el);
}

// One series per ad: [[x seconds], [clicks ad 1], ...] from BatchGetAdClicks answers.
function seriesData(answers) {
  const xs = (answers[0] ? answers[0].buckets : []).map((b) => b.start_ms / 1000);
  return [xs].concat(answers.map((a) => a.buckets.map((b) => b.clicks)));
}

async function refreshTopChart(ads) {
  const ids = ads.slice(0, CHART_ADS).map((a) => a.ad_id);
  const sig = ids.join(",");
  const now = Date.now();
  if (sig === state.topCharted && now - state.lastTopFetch < 5000) return;
  state.topCharted = sig;
  state.lastTopFetch = now;
  if (!ids.length) return;
  const q = ids.map((id) => "ad_id=" + id).join("&");
  const r = await fetch(`/v1/ads/clicks?${q}&last_minutes=${WINDOW_MINUTES}&granularity=minute`, { headers: headers() });
  if (!r.ok) return;
  const v = await r.json();
  state.chartTop = chart($("#chart-top"), "", ids.map((id) => "ad " + id), seriesData(v.ads));
  $("#chart-top").dataset.ads = sig;
}

function renderTop(v) {
  const body = $("#top tbody");
  body.textContent = "";
  v.ads.forEach((a, i) => {
    const tr = document.createElement("tr");
    tr.dataset.ad = a.ad_id;
    if (String(a.ad_id) === String(state.selected)) tr.className = "selected";
    for (const text of [i + 1, a.ad_id, a.clicks]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => select(a.ad_id));
    body.appendChild(tr);
  });
  $("#watermark").textContent = v.watermark_ms > 0 ? fmtTime(v.watermark_ms) : "–";
  $("#watermark").dataset.ms = v.watermark_ms;
  lag();
  if (state.selected === null && v.ads.length) select(v.ads[0].ad_id);
  refreshTopChart(v.ads);
  document.body.dataset.topUpdates = String(Number(document.body.dataset.topUpdates || 0) + 1);
}

function lag() {
  const w = Number($("#watermark").dataset.ms || 0);
  $("#lag").textContent = w > 0 ? ((Date.now() - w) / 1000).toFixed(0) + " s" : "–";
}

function select(ad) {
  state.selected = ad;
  for (const tr of document.querySelectorAll("#top tbody tr")) {
    tr.className = tr.dataset.ad === String(ad) ? "selected" : "";
  }
  $("#ad-id").textContent = ad;
  $("#ad-total").textContent = "…";
  $("#ad-invalid").textContent = "…";
  if (state.adWatch) state.adWatch.abort();
  state.adWatch = watch(`/v1/ads/${ad}/clicks/watch?last_minutes=${WINDOW_MINUTES}&granularity=minute`, (v) => {
    if (String(v.ad_id) !== String(state.selected)) return;
    $("#ad-total").textContent = v.total_clicks;
    // Counted apart by the aggregator's rules, whatever `traffic` asked (valid here).
    const invalid = Object.entries(v.invalid_by_reason || {}).filter(([, n]) => n > 0);
    const nInvalid = invalid.reduce((s, [, n]) => s + Number(n), 0);
    $("#ad-invalid").textContent = nInvalid +
      (invalid.length ? " (" + invalid.map(([r, n]) => `${r} ${n}`).join(", ") + ")" : "");
    $("#ad-invalid").dataset.total = nInvalid;
    state.chartAd = chart($("#chart-ad"), "", ["ad " + v.ad_id], seriesData([v]));
  });
}

// Clicks by outcome since start, from the server's own /metrics (no key needed there).
async function outcomes() {
  try {
    const text = await (await fetch("/metrics")).text();
    const counts = {};
    for (const m of text.matchAll(/^adclick_aggregator_clicks_total\{outcome="([a-z_]+)"\} (\d+)/gm)) {
      counts[m[1]] = Number(m[2]);
    }
    // `applied` is every counted click (valid and invalid traffic), `late` the corrections
    // among them; the rest were not counted (duplicates, too old).
    const counted = counts.applied || 0;
    const other = Object.entries(counts).filter(([k]) => k !== "applied" && k !== "late");
    const refused = other.reduce((s, [, n]) => s + n, 0);
    // Of the counted, those the invalid-traffic rules flagged (not billed), by reason.
    let invalid = 0;
    for (const m of text.matchAll(/^adclick_aggregator_invalid_clicks_total\{reason="([a-z_]+)"\} (\d+)/gm)) {
      invalid += Number(m[2]);
    }
    $("#outcomes").textContent = `since start: ${counted} counted (${counted - invalid} valid, ` +
      `${invalid} invalid; ${counts.late || 0} late), ` +
      `${refused} not counted` + (other.length ? " (" + other.map(([k, n]) => `${k} ${n}`).join(", ") + ")" : "");
    $("#outcomes").dataset.counted = counted;
    $("#outcomes").dataset.invalid = invalid;
  } catch (e) { /* the header line just stays as it was */ }
}

function start() {
  $("#login").hidden = true;
  $("#dash").hidden = false;
  $("#logout").hidden = false;
  $("#window").textContent = WINDOW_MINUTES;
  if (state.topWatch) state.topWatch.abort();
  state.selected = null;
  state.topWatch = watch(`/v1/ads/top/watch?n=${TOP_N}&last_minutes=${WINDOW_MINUTES}`, renderTop);
  outcomes();
  if (!state.timers) state.timers = [setInterval(outcomes, 5000), setInterval(lag, 1000)];
}

function logout() {
  sessionStorage.removeItem(KEY);
  location.reload();
}

// A key the server refuses: forgotten, and asked for again (the error stays shown).
function forget() {
  sessionStorage.removeItem(KEY);
  $("#dash").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
}

$("#logout").addEventListener("click", (e) => { e.preventDefault(); logout(); });
$("#login").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = $("#key").value.trim();
  sessionStorage.setItem(KEY, state.key);
  start();
});
if (state.key) start(); else $("#login").hidden = false;
