//! Click load over raw HTTP for fault tests: several concurrent clients posting signed
//! `ClickBatch`es to a set of collectors, each retrying a request (on the next collector)
//! until it is answered 202, and a ledger of every click whose request got a 202.
//!
//! It records what the collectors acknowledged and nothing else: whether that was counted
//! right is for the test to decide.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adclick_proto::v1::{self, ClickBatch};
use adclick_sdk::{ImpressionSigner, MintedToken};
use prost::Message;

use crate::common::now_ms;
use crate::stack::{ADV_A, http_client, placement};

/// One POST of `tokens` as a `ClickBatch` to `url` (`.../v1/clicks`), every timestamp now:
/// the response status, or the transport error.
pub async fn post_clicks(
    http: &reqwest::Client,
    url: &str,
    tokens: &[MintedToken],
    timeout: Duration,
) -> Result<u16, String> {
    let now = now_ms();
    let body = ClickBatch {
        sent_at_ms: now,
        clicks: tokens
            .iter()
            .map(|m| v1::Click {
                token: m.token.clone(),
                occurred_at_ms: now,
                sent_at_ms: now,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    http.post(url)
        .header("content-type", "application/x-protobuf")
        .timeout(timeout)
        .body(body.encode_to_vec())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// What an [`HttpLoad`] sent and what was acknowledged.
#[derive(Debug, Default, Clone)]
pub struct AckLedger {
    /// Impression id -> ad, for every click of a request answered 202.
    pub acked: BTreeMap<[u8; 16], u64>,
    /// Impression ids of every click posted at least once (acked or not).
    pub posted: BTreeSet<[u8; 16]>,
    /// Requests answered 202.
    pub batches: u64,
    /// Requests answered 202 after more than one attempt (their clicks may have been made
    /// durable by an earlier attempt too).
    pub retried: u64,
    /// Acknowledged requests posted once more, to the next collector, after their 202 (a
    /// client that lost the answer and retried elsewhere), and answered 202 there too:
    /// their clicks are durable on two collectors, under two `(collector_id, seq)`.
    pub resent: u64,
    /// Requests given up (no 202 within the give-up time): their clicks are in `posted`
    /// only, and may or may not be counted.
    pub gave_up: u64,
}

impl AckLedger {
    /// Distinct acknowledged impressions per ad: what must be counted.
    pub fn per_ad(&self) -> BTreeMap<u64, u64> {
        let mut out = BTreeMap::new();
        for ad in self.acked.values() {
            *out.entry(*ad).or_insert(0) += 1;
        }
        out
    }

    /// Adds `other` (a later load's ledger) to this one.
    pub fn merge(&mut self, other: &AckLedger) {
        self.acked.extend(other.acked.iter().map(|(k, v)| (*k, *v)));
        self.posted.extend(other.posted.iter().copied());
        self.batches += other.batches;
        self.retried += other.retried;
        self.resent += other.resent;
        self.gave_up += other.gave_up;
    }
}

/// The shape of an [`HttpLoad`].
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Concurrent clients.
    pub clients: usize,
    /// Clicks per request.
    pub per_batch: usize,
    /// Pause after each acknowledged request.
    pub pause: Duration,
    /// A request not answered 202 within this is given up (counted in `gave_up`).
    pub give_up: Duration,
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// Every `resend_every`-th acknowledged request of a client is posted again to the
    /// next collector (0: never; see [`AckLedger::resent`]).
    pub resend_every: u64,
    /// The ads clicked (advertiser `ADV_A`, campaign 1), spread evenly.
    pub ads: Vec<u64>,
}

/// Concurrent clients posting signed click batches to collectors until stopped. Client
/// `i`'s attempt `k` of a request goes to collector `(i + k) % n`, so a retry after a
/// failure moves to the next collector.
#[derive(Debug)]
pub struct HttpLoad {
    stop: Arc<AtomicBool>,
    acked_clicks: Arc<AtomicU64>,
    failed_attempts: Arc<AtomicU64>,
    ledger: Arc<Mutex<AckLedger>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl HttpLoad {
    /// Starts `spec.clients` clients posting to `collectors` (base URLs, `http://host:port`).
    pub fn start(collectors: Vec<String>, signer: ImpressionSigner, spec: LoadSpec) -> HttpLoad {
        assert!(!collectors.is_empty() && !spec.ads.is_empty());
        let stop = Arc::new(AtomicBool::new(false));
        let acked_clicks = Arc::new(AtomicU64::new(0));
        let failed_attempts = Arc::new(AtomicU64::new(0));
        let ledger = Arc::new(Mutex::new(AckLedger::default()));
        let urls: Arc<Vec<String>> = Arc::new(
            collectors
                .iter()
                .map(|c| format!("{c}/v1/clicks"))
                .collect(),
        );
        let tasks = (0..spec.clients)
            .map(|i| {
                let (stop, acked_clicks, failed, ledger, urls, signer, spec) = (
                    stop.clone(),
                    acked_clicks.clone(),
                    failed_attempts.clone(),
                    ledger.clone(),
                    urls.clone(),
                    signer.clone(),
                    spec.clone(),
                );
                tokio::spawn(async move {
                    let http = http_client();
                    let mut n = i;
                    let mut sent = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let tokens: Vec<MintedToken> = (0..spec.per_batch)
                            .map(|_| {
                                n += spec.clients;
                                let ad = spec.ads[(n * 7 + n / spec.ads.len()) % spec.ads.len()];
                                signer.mint(&placement(ad, ADV_A, 1)).unwrap()
                            })
                            .collect();
                        ledger
                            .lock()
                            .unwrap()
                            .posted
                            .extend(tokens.iter().map(|t| t.impression.impression_id));
                        let started = Instant::now();
                        let mut attempt = 0;
                        let ok = loop {
                            let url = &urls[(i + attempt) % urls.len()];
                            attempt += 1;
                            if post_clicks(&http, url, &tokens, spec.attempt_timeout).await
                                == Ok(202)
                            {
                                break true;
                            }
                            failed.fetch_add(1, Ordering::SeqCst);
                            if started.elapsed() > spec.give_up {
                                break false;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        };
                        let mut resent = false;
                        if ok && spec.resend_every > 0 {
                            sent += 1;
                            if sent.is_multiple_of(spec.resend_every) {
                                let url = &urls[(i + attempt) % urls.len()];
                                resent = post_clicks(&http, url, &tokens, spec.attempt_timeout)
                                    .await
                                    == Ok(202);
                            }
                        }
                        {
                            let mut l = ledger.lock().unwrap();
                            l.resent += u64::from(resent);
                            if ok {
                                l.acked.extend(
                                    tokens
                                        .iter()
                                        .map(|t| (t.impression.impression_id, t.impression.ad_id)),
                                );
                                l.batches += 1;
                                l.retried += u64::from(attempt > 1);
                                acked_clicks.fetch_add(tokens.len() as u64, Ordering::SeqCst);
                            } else {
                                l.gave_up += 1;
                            }
                        }
                        tokio::time::sleep(spec.pause).await;
                    }
                })
            })
            .collect();
        HttpLoad {
            stop,
            acked_clicks,
            failed_attempts,
            ledger,
            tasks,
        }
    }

    /// Clicks acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked_clicks.load(Ordering::SeqCst)
    }

    /// Attempts that got no 202 so far.
    pub fn failed_attempts(&self) -> u64 {
        self.failed_attempts.load(Ordering::SeqCst)
    }

    /// Waits until `n` more clicks than `from` are acknowledged (or `within`); whether
    /// they were.
    pub async fn wait_acked(&self, from: u64, n: u64, within: Duration) -> bool {
        crate::common::eventually(within, || self.acked() >= from + n).await
    }

    /// Stops the clients: each finishes the request it is in (retrying it until acked or
    /// given up), then the ledger is returned.
    pub async fn stop(self) -> AckLedger {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.ledger.lock().unwrap().clone()
    }
}
