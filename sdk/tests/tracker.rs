//! Tracker tests against a real HTTP server (hyper on 127.0.0.1:0) that records every
//! request and answers from a script. Expected values are computed from what each test
//! sent, never from the tracker.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adclick_proto::v1::{ClickBatch, Device as WireDevice};
use adclick_sdk::core::Clock;
use adclick_sdk::{
    ClickError, Device, Dimensions, OverflowPolicy, RetryPolicy, SdkError, Tracker, TrackerEvent,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use prost::Message;
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
struct Recorded {
    at: Instant,
    path: String,
    content_type: String,
    batch: ClickBatch,
}

#[derive(Default)]
struct Recorder {
    requests: Mutex<Vec<Recorded>>,
    /// (status, Retry-After) answers, in order; 202 once exhausted.
    script: Mutex<VecDeque<(u16, Option<&'static str>)>>,
}

impl Recorder {
    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
    async fn wait_for(&self, n: usize) -> Vec<Recorded> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.requests();
            if r.len() >= n || Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn server(script: &[(u16, Option<&'static str>)]) -> (String, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    rec.script.lock().unwrap().extend(script.iter().copied());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = rec.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let r = r.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let r = r.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let content_type = req
                            .headers()
                            .get("content-type")
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let batch = ClickBatch::decode(body.as_ref()).unwrap();
                        r.requests.lock().unwrap().push(Recorded {
                            at: Instant::now(),
                            path,
                            content_type,
                            batch,
                        });
                        let (status, retry_after) =
                            r.script.lock().unwrap().pop_front().unwrap_or((202, None));
                        let mut resp = Response::builder().status(status);
                        if let Some(ra) = retry_after {
                            resp = resp.header("retry-after", ra);
                        }
                        Ok::<_, Infallible>(resp.body(Full::new(Bytes::from("{}"))).unwrap())
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    (format!("http://{addr}"), rec)
}

/// An endpoint where nothing listens (connections are refused).
async fn dead_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

struct TestClock(AtomicI64);
impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        self.0.fetch_add(1, Ordering::SeqCst)
    }
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        max_attempts,
        ..RetryPolicy::default()
    }
}

fn tokens(r: &Recorded) -> Vec<String> {
    r.batch.clicks.iter().map(|c| c.token.clone()).collect()
}

#[tokio::test]
async fn batches_by_size_then_by_explicit_flush() {
    let (endpoint, rec) = server(&[]).await;
    let tracker = Tracker::builder(&endpoint)
        .batch_size(3)
        .flush_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let dims = Dimensions::new()
        .country("de")
        .device(Device::Tablet)
        .os("android")
        .site("news.example")
        .user_id("u1");
    for i in 0..7 {
        tracker.click(&format!("tok{i}"), dims.clone()).unwrap();
    }
    let got = rec.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        rec.requests().len(),
        2,
        "the partial batch waits for the timer or a flush"
    );
    assert_eq!(tokens(&got[0]), ["tok0", "tok1", "tok2"]);
    assert_eq!(tokens(&got[1]), ["tok3", "tok4", "tok5"]);
    assert_eq!(tracker.queued(), 1);
    tracker.flush().await.unwrap();
    let got = rec.requests();
    assert_eq!(got.len(), 3);
    assert_eq!(tokens(&got[2]), ["tok6"]);
    for r in &got {
        assert_eq!(r.path, "/v1/clicks");
        assert_eq!(r.content_type, "application/x-protobuf");
        assert_eq!(r.batch.sdk_name, "adclick-rust");
        for c in &r.batch.clicks {
            assert_eq!(
                c.sent_at_ms, r.batch.sent_at_ms,
                "sent_at is stamped on the whole batch"
            );
            assert!(c.occurred_at_ms <= c.sent_at_ms);
            assert_eq!(
                (
                    c.country.as_str(),
                    c.device,
                    c.os.as_str(),
                    c.site.as_str(),
                    c.user_id.as_str()
                ),
                (
                    "DE",
                    WireDevice::Tablet as i32,
                    "android",
                    "news.example",
                    "u1"
                )
            );
        }
    }
    assert_eq!(tracker.stats().sent, 7);
    assert_eq!(tracker.stats().batches, 3);
}

#[tokio::test]
async fn batches_by_time() {
    let (endpoint, rec) = server(&[]).await;
    let tracker = Tracker::builder(&endpoint)
        .batch_size(100)
        .flush_interval(Duration::from_millis(150))
        .build()
        .unwrap();
    tracker.click("a", Dimensions::new()).unwrap();
    tracker.click("b", Dimensions::new()).unwrap();
    let got = rec.wait_for(1).await;
    assert_eq!(got.len(), 1, "the timer sent the partial batch");
    assert_eq!(tokens(&got[0]), ["a", "b"]);
    assert_eq!(tracker.queued(), 0);
}

#[tokio::test]
async fn retries_5xx_then_succeeds_with_fresh_sent_at() {
    let (endpoint, rec) = server(&[(503, None), (500, None)]).await;
    let clock = Arc::new(TestClock(AtomicI64::new(1_000)));
    let tracker = Tracker::builder(&endpoint)
        .flush_interval(Duration::from_secs(3600))
        .retry_policy(fast_retry(5))
        .clock(clock)
        .build()
        .unwrap();
    tracker.click("x", Dimensions::new()).unwrap();
    tracker.click("y", Dimensions::new()).unwrap();
    tracker.flush().await.unwrap();
    let got = rec.requests();
    assert_eq!(got.len(), 3);
    for r in &got {
        assert_eq!(tokens(r), ["x", "y"], "the same clicks are resent");
        assert_eq!(
            r.batch.clicks[0].occurred_at_ms, 1_000,
            "occurred_at is kept"
        );
    }
    assert!(got[0].batch.sent_at_ms < got[1].batch.sent_at_ms);
    assert!(got[1].batch.sent_at_ms < got[2].batch.sent_at_ms);
    let s = tracker.stats();
    assert_eq!((s.sent, s.retries, s.rejected), (2, 2, 0));
}

#[tokio::test]
async fn retry_after_is_respected() {
    let (endpoint, rec) = server(&[(429, Some("1"))]).await;
    let tracker = Tracker::builder(&endpoint)
        .flush_interval(Duration::from_secs(3600))
        .retry_policy(fast_retry(3))
        .build()
        .unwrap();
    tracker.click("x", Dimensions::new()).unwrap();
    tracker.flush().await.unwrap();
    let got = rec.requests();
    assert_eq!(got.len(), 2);
    let gap = got[1].at - got[0].at;
    // Without Retry-After the backoff would be at most 5 ms.
    assert!(gap >= Duration::from_millis(1000), "waited only {gap:?}");
}

#[tokio::test]
async fn other_4xx_is_not_retried_and_is_reported() {
    let (endpoint, rec) = server(&[(400, None)]).await;
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let tracker = Tracker::builder(&endpoint)
        .flush_interval(Duration::from_secs(3600))
        .retry_policy(fast_retry(5))
        .on_event(move |e| ev.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    for t in ["a", "b", "c"] {
        tracker.click(t, Dimensions::new()).unwrap();
    }
    tracker.flush().await.unwrap();
    assert_eq!(rec.requests().len(), 1);
    let s = tracker.stats();
    assert_eq!((s.rejected, s.sent, s.retries), (3, 0, 0));
    assert_eq!(
        events.lock().unwrap().as_slice(),
        [TrackerEvent::Rejected {
            status: 400,
            clicks: 3,
            message: "{}".into()
        }]
    );
    assert_eq!(tracker.queued(), 0);
}

#[tokio::test]
async fn unreachable_collector_gives_up_keeps_clicks_and_counts() {
    let endpoint = dead_endpoint().await;
    let tracker = Tracker::builder(&endpoint)
        .flush_interval(Duration::from_secs(3600))
        .retry_policy(fast_retry(2))
        .build()
        .unwrap();
    tracker.click("a", Dimensions::new()).unwrap();
    let err = tracker.flush().await.unwrap_err();
    assert!(
        matches!(err, SdkError::Undelivered { queued: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("connect"), "{err}");
    let s = tracker.stats();
    assert_eq!((s.retries, s.gave_up, s.sent), (1, 1, 0));
    assert_eq!(tracker.queued(), 1);
}

#[tokio::test]
async fn offline_queue_survives_restart_with_original_occurred_at() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = 1_700_000_000_000;
    {
        // First run: the collector is down; the app is killed (dropped, no shutdown).
        let tracker = Tracker::builder(dead_endpoint().await)
            .flush_interval(Duration::from_secs(3600))
            .retry_policy(fast_retry(1))
            .clock(Arc::new(TestClock(AtomicI64::new(t0))))
            .offline_queue_dir(dir.path())
            .build()
            .unwrap();
        for i in 0..5 {
            tracker
                .click(&format!("tok{i}"), Dimensions::new().country("FR"))
                .unwrap();
        }
        assert!(tracker.flush().await.is_err());
    }
    let (endpoint, rec) = server(&[]).await;
    let later = t0 + 3_600_000;
    let tracker = Tracker::builder(&endpoint)
        .flush_interval(Duration::from_secs(3600))
        .clock(Arc::new(TestClock(AtomicI64::new(later))))
        .offline_queue_dir(dir.path())
        .build()
        .unwrap();
    assert_eq!(tracker.stats().restored, 5);
    // Restored clicks go out without waiting for the flush interval.
    let got = rec.wait_for(1).await;
    let clicks: Vec<_> = got.iter().flat_map(|r| r.batch.clicks.clone()).collect();
    let expected: Vec<(String, i64)> = (0..5).map(|i| (format!("tok{i}"), t0 + i)).collect();
    let actual: Vec<(String, i64)> = clicks
        .iter()
        .map(|c| (c.token.clone(), c.occurred_at_ms))
        .collect();
    assert_eq!(actual, expected);
    assert!(
        clicks
            .iter()
            .all(|c| c.sent_at_ms >= later && c.country == "FR")
    );
    tracker.shutdown().await.unwrap();
    drop(tracker);
    // Nothing is sent twice after another restart.
    let again = Tracker::builder(&endpoint)
        .offline_queue_dir(dir.path())
        .build()
        .unwrap();
    assert_eq!(again.stats().restored, 0);
}

#[tokio::test]
async fn overflow_drop_oldest_is_counted() {
    let (endpoint, rec) = server(&[]).await;
    let events = Arc::new(Mutex::new(0usize));
    let ev = events.clone();
    let tracker = Tracker::builder(&endpoint)
        .batch_size(1)
        .max_queue(3)
        .overflow(OverflowPolicy::DropOldest)
        .flush_interval(Duration::from_secs(3600))
        .on_event(move |e| {
            if let TrackerEvent::Dropped { clicks } = e {
                *ev.lock().unwrap() += clicks;
            }
        })
        .build()
        .unwrap();
    // No await between clicks: on this single-threaded runtime nothing is sent meanwhile.
    for i in 0..6 {
        tracker.click(&format!("t{i}"), Dimensions::new()).unwrap();
    }
    assert_eq!(tracker.stats().dropped_overflow, 3);
    assert_eq!(*events.lock().unwrap(), 3);
    tracker.flush().await.unwrap();
    let sent: Vec<String> = rec.requests().iter().flat_map(tokens).collect();
    assert_eq!(sent, ["t3", "t4", "t5"]);
}

#[tokio::test]
async fn overflow_drop_newest_refuses_and_counts() {
    let (endpoint, rec) = server(&[]).await;
    let tracker = Tracker::builder(&endpoint)
        .batch_size(1)
        .max_queue(3)
        .overflow(OverflowPolicy::DropNewest)
        .flush_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let results: Vec<_> = (0..5)
        .map(|i| tracker.click(&format!("t{i}"), Dimensions::new()))
        .collect();
    assert_eq!(results[3], Err(ClickError::QueueFull));
    assert_eq!(results[4], Err(ClickError::QueueFull));
    assert_eq!(tracker.stats().dropped_overflow, 2);
    tracker.flush().await.unwrap();
    let sent: Vec<String> = rec.requests().iter().flat_map(tokens).collect();
    assert_eq!(sent, ["t0", "t1", "t2"]);
}

#[tokio::test]
async fn invalid_input_and_closed_tracker_are_clear_errors() {
    let (endpoint, _rec) = server(&[]).await;
    assert!(matches!(
        Tracker::builder("ftp://x").build(),
        Err(SdkError::InvalidEndpoint(_))
    ));
    let tracker = Tracker::builder(&endpoint).build().unwrap();
    assert_eq!(
        tracker.click("", Dimensions::new()),
        Err(ClickError::InvalidToken)
    );
    assert!(matches!(
        tracker.click("ok", Dimensions::new().country("Germany")),
        Err(ClickError::InvalidDimension {
            field: "country",
            ..
        })
    ));
    assert_eq!(tracker.stats().invalid, 2);
    tracker.shutdown().await.unwrap();
    assert_eq!(
        tracker.click("ok", Dimensions::new()),
        Err(ClickError::Closed)
    );
}

#[test]
fn build_outside_a_runtime_is_a_clear_error() {
    assert!(matches!(
        Tracker::builder("http://127.0.0.1:1").build(),
        Err(SdkError::NoRuntime)
    ));
}
