//! wasm-bindgen tests of the wrapper, run under Node by `scripts/test-wasm.sh`
//! (`wasm-bindgen-test-runner`). Node has `fetch` but no `document`, `localStorage` or
//! `navigator.sendBeacon`, so these cover option parsing, click validation surfacing as
//! JS `Error`s, the stored-click codec, batch encoding, and the real `fetch` send path
//! (delivery, retry, rejection, give-up, the beacon's keepalive fallback) against a
//! small Node HTTP server started by the test.
//!
//! Must not depend on a browser: nothing here may need `document` or `localStorage`
//! (those are covered by the host unit tests through `KeyValue`).

use adclick_proto::v1;
use adclick_sdk::core::OfflineQueue;
use js_sys::{Array, Function, Object, Reflect};
use prost::Message as _;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::wasm_bindgen_test;

use crate::queue::{BrowserQueue, MemoryKv, decode_click, encode_click};
use crate::tracker::{SDK_NAME, Tracker, beacon_chunks};

const TOKEN: &str = "AQ_token-1";

fn obj(pairs: &[(&str, JsValue)]) -> JsValue {
    let o = Object::new();
    for (k, v) in pairs {
        Reflect::set(&o, &JsValue::from_str(k), v).unwrap();
    }
    o.into()
}

/// A `ClickDimensions` argument.
fn dims(pairs: &[(&str, JsValue)]) -> crate::options::ClickDimensionsArg {
    obj(pairs).unchecked_into()
}

fn s(v: &str) -> JsValue {
    JsValue::from_str(v)
}

fn n(v: f64) -> JsValue {
    JsValue::from_f64(v)
}

/// The message of a thrown value, asserting that it is a JS `Error`.
fn error_message(e: impl Into<JsValue>) -> String {
    let v: JsValue = e.into();
    let err = v.dyn_into::<js_sys::Error>().expect("a JS Error");
    String::from(err.message())
}

fn stat(t: &Tracker, name: &str) -> f64 {
    Reflect::get(&t.stats(), &s(name))
        .unwrap()
        .as_f64()
        .unwrap()
}

fn tracker(endpoint: &str, extra: &[(&str, JsValue)]) -> Tracker {
    let mut pairs = vec![
        ("endpoint", s(endpoint)),
        ("persist", JsValue::FALSE),
        // Long enough that only the test's flush() sends.
        ("flushIntervalMs", n(3_600_000.0)),
    ];
    pairs.extend(extra.iter().cloned());
    Tracker::new(obj(&pairs)).expect("valid options")
}

#[wasm_bindgen_test]
fn options_are_parsed_and_bad_ones_throw_errors() {
    let t = tracker(
        "http://127.0.0.1:9",
        &[("batchSize", n(5.0)), ("maxQueue", n(10.0))],
    );
    assert_eq!(t.queued(), 0);
    assert!(
        !t.persistent(),
        "persist: false, and Node has no localStorage"
    );

    let cases: Vec<(JsValue, &str)> = vec![
        (JsValue::UNDEFINED, "must be an object"),
        (s("http://x"), "must be an object"),
        (obj(&[]), "`endpoint` is required"),
        (obj(&[("endpoint", s("ftp://x"))]), "invalid endpoint"),
        (obj(&[("endpoint", n(1.0))]), "`endpoint` must be a string"),
        (
            obj(&[("endpoint", s("http://x")), ("batchSize", s("10"))]),
            "`batchSize` must be a number",
        ),
        (
            obj(&[("endpoint", s("http://x")), ("batchSize", n(0.0))]),
            "`batchSize` must be an integer from 1 to 1000",
        ),
        (
            obj(&[("endpoint", s("http://x")), ("flushIntervalMs", n(2.5))]),
            "`flushIntervalMs` must be an integer",
        ),
        (
            obj(&[("endpoint", s("http://x")), ("persist", s("yes"))]),
            "`persist` must be a boolean",
        ),
        (
            obj(&[("endpoint", s("http://x")), ("storageKey", s("a:b"))]),
            "`storageKey` must be a non-empty string",
        ),
        (
            obj(&[("endpoint", s("http://x")), ("onEvent", n(1.0))]),
            "`onEvent` must be a function",
        ),
    ];
    for (options, want) in cases {
        let err = Tracker::new(options).expect_err(want);
        let msg = error_message(err);
        assert!(msg.contains(want), "{msg:?} does not contain {want:?}");
    }
}

#[wasm_bindgen_test]
fn click_validation_errors_surface_as_js_errors() {
    let t = tracker("http://127.0.0.1:9", &[]);
    let cases: Vec<(JsValue, JsValue, &str)> = vec![
        (s(""), JsValue::UNDEFINED, "invalid token"),
        (s("a b"), JsValue::UNDEFINED, "invalid token"),
        (
            n(5.0),
            JsValue::UNDEFINED,
            "invalid token: must be a string",
        ),
        (
            s(TOKEN),
            obj(&[("country", s("USA"))]),
            "invalid dimension `country`",
        ),
        (
            s(TOKEN),
            obj(&[("device", s("fridge"))]),
            "invalid dimension `device`",
        ),
        (
            s(TOKEN),
            obj(&[("os", s(&"x".repeat(300)))]),
            "invalid dimension `os`",
        ),
        (
            s(TOKEN),
            obj(&[("userId", n(7.0))]),
            "`userId` must be a string",
        ),
        (s(TOKEN), s("US"), "click dimensions must be an object"),
    ];
    let total = cases.len();
    for (token, dims, want) in cases {
        let msg = error_message(t.click(token, Some(dims.unchecked_into())).expect_err(want));
        assert!(msg.contains(want), "{msg:?} does not contain {want:?}");
    }
    assert_eq!(t.queued(), 0, "refused clicks are not queued");
    assert_eq!(stat(&t, "invalid"), total as f64);

    t.click(
        s(TOKEN),
        Some(dims(&[
            ("country", s("de")),
            ("device", s("Mobile")),
            ("userId", s("u1")),
        ])),
    )
    .expect("valid click");
    t.click(s(TOKEN), None).expect("no dimensions");
    assert_eq!(t.queued(), 2);
    assert_eq!(stat(&t, "queued"), 2.0);
}

#[wasm_bindgen_test]
fn stored_clicks_round_trip() {
    let click = v1::Click {
        token: TOKEN.into(),
        occurred_at_ms: 1_700_000_000_001,
        country: "US".into(),
        ..Default::default()
    };
    assert_eq!(decode_click(&encode_click(&click)), Some(click.clone()));

    let mut q = BrowserQueue::new(Some(Box::new(MemoryKv::default())), "adclick", "p1", 10);
    assert!(q.load().unwrap().is_empty());
    q.append(&adclick_sdk::core::StoredClick { seq: 0, click })
        .unwrap();
    assert_eq!(q.pending()[0].1.occurred_at_ms, 1_700_000_000_001);
}

#[wasm_bindgen_test]
fn batches_encode_as_click_batch() {
    let clicks: Vec<_> = (0..5u64)
        .map(|i| {
            (
                i,
                v1::Click {
                    token: format!("t{i}"),
                    occurred_at_ms: 100 + i as i64,
                    ..Default::default()
                },
            )
        })
        .collect();
    let chunks = beacon_chunks(&clicks, 2, 999);
    assert_eq!(chunks.len(), 3);
    let batch = v1::ClickBatch::decode(chunks[2].body.as_slice()).unwrap();
    assert_eq!(batch.sdk_name, SDK_NAME);
    assert_eq!((batch.sent_at_ms, batch.clicks.len()), (999, 1));
    assert_eq!(batch.clicks[0].occurred_at_ms, 104);
    assert_eq!(batch.clicks[0].sent_at_ms, 999);
}

/// A Node HTTP server answering with `plan` (one `[status, retryAfter?]` per request, the
/// last repeated) and logging `{ type, body }` of each request.
struct Server {
    handle: JsValue,
}

impl Server {
    async fn start(plan: &[(u16, Option<u32>)]) -> Server {
        let steps = Array::new();
        for (status, retry_after) in plan {
            let step = Array::new();
            step.push(&n(f64::from(*status)));
            if let Some(ra) = retry_after {
                step.push(&n(f64::from(*ra)));
            }
            steps.push(&step);
        }
        let start = Function::new_with_args(
            "plan",
            r#"
            return (async () => {
              const http = await import('node:http');
              const log = [];
              const server = http.createServer((req, res) => {
                const chunks = [];
                req.on('data', (c) => chunks.push(c));
                req.on('end', () => {
                  log.push({
                    type: req.headers['content-type'] || '',
                    body: new Uint8Array(Buffer.concat(chunks)),
                  });
                  const step = plan.length > 1 ? plan.shift() : plan[0];
                  const headers = { 'access-control-allow-origin': '*', connection: 'close' };
                  if (step.length > 1) headers['retry-after'] = String(step[1]);
                  res.writeHead(step[0], headers);
                  res.end(step[0] >= 400 ? 'refused by test' : '');
                });
              });
              await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
              const url = 'http://127.0.0.1:' + server.address().port;
              const close = () => new Promise((ok) => {
                if (server.closeAllConnections) server.closeAllConnections();
                server.close(() => ok());
              });
              return { url, log, close };
            })();
            "#,
        );
        let promise: js_sys::Promise = start.call1(&JsValue::NULL, &steps).unwrap().into();
        Server {
            handle: JsFuture::from(promise).await.unwrap(),
        }
    }

    fn url(&self) -> String {
        Reflect::get(&self.handle, &s("url"))
            .unwrap()
            .as_string()
            .unwrap()
    }

    /// (content type, decoded batch) of each request so far.
    fn requests(&self) -> Vec<(String, v1::ClickBatch)> {
        let log: Array = Reflect::get(&self.handle, &s("log")).unwrap().into();
        log.iter()
            .map(|entry| {
                let ty = Reflect::get(&entry, &s("type"))
                    .unwrap()
                    .as_string()
                    .unwrap();
                let body: js_sys::Uint8Array = Reflect::get(&entry, &s("body")).unwrap().into();
                let batch = v1::ClickBatch::decode(body.to_vec().as_slice()).unwrap();
                (ty, batch)
            })
            .collect()
    }

    async fn close(self) {
        let close: Function = Reflect::get(&self.handle, &s("close")).unwrap().into();
        let p: js_sys::Promise = close.call0(&JsValue::NULL).unwrap().into();
        JsFuture::from(p).await.unwrap();
    }
}

async fn flush(t: &Tracker) -> Result<(), String> {
    JsFuture::from(t.flush())
        .await
        .map(|_| ())
        .map_err(error_message)
}

/// Collects `onEvent` calls as `type` strings.
fn event_log() -> (Array, JsValue) {
    let log = Array::new();
    let f = Function::new_with_args("log", "return (e) => { log.push(e.type); };")
        .call1(&JsValue::NULL, &log)
        .unwrap();
    (log, f)
}

fn types(log: &Array) -> Vec<String> {
    log.iter().filter_map(|v| v.as_string()).collect()
}

#[wasm_bindgen_test]
async fn flush_delivers_batches_with_original_occurred_at() {
    let server = Server::start(&[(200, None)]).await;
    let t = tracker(&server.url(), &[("batchSize", n(2.0))]);
    for country in ["US", "DE", "FR"] {
        t.click(s(TOKEN), Some(dims(&[("country", s(country))])))
            .unwrap();
    }
    flush(&t).await.expect("delivered");
    assert_eq!(t.queued(), 0);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "3 clicks in batches of 2");
    assert!(reqs.iter().all(|(ty, _)| ty == "application/x-protobuf"));
    let countries: Vec<_> = reqs
        .iter()
        .flat_map(|(_, b)| b.clicks.iter().map(|c| c.country.clone()))
        .collect();
    assert_eq!(countries, vec!["US", "DE", "FR"]);
    let b = &reqs[0].1;
    assert_eq!(b.sdk_name, SDK_NAME);
    assert!(b.clicks.iter().all(|c| c.sent_at_ms == b.sent_at_ms));
    assert!(b.clicks[0].occurred_at_ms <= b.sent_at_ms);
    assert_eq!((stat(&t, "sent"), stat(&t, "batches")), (3.0, 2.0));
    server.close().await;
}

#[wasm_bindgen_test]
async fn retries_then_delivers_and_rejects_for_good() {
    // 503 (Retry-After: 0), then 200: one retry.
    let server = Server::start(&[(503, Some(0)), (200, None)]).await;
    let (log, hook) = event_log();
    let t = tracker(&server.url(), &[("onEvent", hook)]);
    t.click(s(TOKEN), None).unwrap();
    flush(&t).await.expect("delivered after a retry");
    assert_eq!(server.requests().len(), 2);
    assert_eq!(stat(&t, "retries"), 1.0);
    assert_eq!(types(&log), vec!["retrying"]);
    server.close().await;

    // 400: dropped, counted and reported; flush itself succeeds (nothing left).
    let server = Server::start(&[(400, None)]).await;
    let (log, hook) = event_log();
    let t = tracker(&server.url(), &[("onEvent", hook)]);
    t.click(s(TOKEN), None).unwrap();
    flush(&t).await.expect("nothing left to send");
    assert_eq!((t.queued(), stat(&t, "rejected")), (0, 1.0));
    assert_eq!(types(&log), vec!["rejected"]);
    server.close().await;
}

#[wasm_bindgen_test]
async fn gives_up_after_max_attempts_and_keeps_the_clicks() {
    let server = Server::start(&[(503, Some(0))]).await;
    let t = tracker(&server.url(), &[("maxAttempts", n(2.0))]);
    t.click(s(TOKEN), None).unwrap();
    let err = flush(&t).await.expect_err("undelivered");
    assert!(
        err.contains("1 clicks not delivered yet: HTTP 503"),
        "{err}"
    );
    assert_eq!(server.requests().len(), 2);
    assert_eq!((t.queued(), stat(&t, "gaveUp")), (1, 1.0));
    server.close().await;

    // Nothing listening: a transport error, also retried and kept.
    let t = tracker("http://127.0.0.1:9", &[("maxAttempts", n(1.0))]);
    t.click(s(TOKEN), None).unwrap();
    let err = flush(&t).await.expect_err("undelivered");
    assert!(err.contains("1 clicks not delivered yet"), "{err}");
    assert_eq!(t.queued(), 1);
}

#[wasm_bindgen_test]
async fn hide_hands_clicks_to_keepalive_fetch_without_sendbeacon_once() {
    let server = Server::start(&[(200, None)]).await;
    let (log, hook) = event_log();
    let t = tracker(&server.url(), &[("onEvent", hook)]);
    t.click(s(TOKEN), Some(dims(&[("country", s("US"))])))
        .unwrap();
    t.click(s(TOKEN), Some(dims(&[("country", s("DE"))])))
        .unwrap();
    t.send_beacon();
    t.send_beacon(); // already handed off: nothing more
    assert_eq!(types(&log), vec!["beacon"]);
    assert_eq!(stat(&t, "beaconed"), 2.0);
    // A beacon is a copy: the clicks stay queued until a fetch sees a 2xx.
    assert_eq!(t.queued(), 2);
    // The keepalive request is fire-and-forget; give it a moment to land.
    for _ in 0..50 {
        if !server.requests().is_empty() {
            break;
        }
        crate::js::sleep(20.0).await;
    }
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].1.clicks.len(), 2);
    flush(&t).await.expect("delivered");
    assert_eq!(t.queued(), 0);
    server.close().await;
}
