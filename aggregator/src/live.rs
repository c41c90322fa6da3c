//! Live queries: `WatchTopAds` and `WatchAdClicks` (gRPC server streaming) and their HTTP
//! mirror as Server-Sent Events. Written once over the [`QueryBackend`] seam, so the
//! aggregator and the query front both serve them.
//!
//! A watch re-asks its query every interval (the request's `interval_ms`, or
//! `query.watch_interval_ms`) and sends the answer when it differs from the last one sent
//! (ads, counts, range or watermark): at most one update per interval, none while nothing
//! changes. The first answer goes out at once.
//!
//! Bounded, whoever the client is:
//! - **Slow readers.** Updates wait in a channel of `query.watch_buffer` slots (plus one
//!   kept for the goodbye). A client that leaves them unread — a full channel when the
//!   next update is due — is sent RESOURCE_EXHAUSTED ("fell behind") after what it has
//!   not yet read, and the watch ends: a stalled client holds at most the buffer's
//!   answers, never a growing queue. Counted as refused with reason `fell_behind`.
//! - **How many.** At most `query.watch_max_streams` watches per process and
//!   `query.watch_max_per_key` per API key; beyond them a new watch is refused with
//!   RESOURCE_EXHAUSTED (HTTP 429). Each costs one query per interval at most.
//! - **Who.** A watch is authorised and charged to the key's rate limit once, when it
//!   opens; an unauthenticated caller gets nothing.
//!
//! A query that stops being answerable (its fixed range falls out of retention, a shard
//! of the front goes down) ends the watch with that query's status. A client that goes
//! away ends it at once (the task waits on the channel's closing as well as the clock).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Status;

use crate::api::{Api, BackendError};
use crate::config::QueryConfig;
use crate::validate::{Field, Reason, Violations};

/// Shortest `interval_ms` a watch may ask for.
pub const MIN_INTERVAL_MS: u32 = 100;
/// Longest `interval_ms` a watch may ask for.
pub const MAX_INTERVAL_MS: u32 = 60_000;

/// The watch limits of a process and its open watches.
#[derive(Debug)]
pub struct Watchers {
    default_interval_ms: u32,
    max_streams: usize,
    max_per_key: usize,
    buffer: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_key: HashMap<String, usize>,
}

/// One open watch's place under the limits; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    watchers: Arc<Watchers>,
    key: String,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.watchers.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_key.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_key.remove(&self.key);
            }
        }
        self.gauge.dec();
    }
}

impl Watchers {
    /// The limits of `[query]`.
    pub fn new(q: &QueryConfig) -> Self {
        Watchers {
            default_interval_ms: q.watch_interval_ms,
            max_streams: q.watch_max_streams,
            max_per_key: q.watch_max_per_key,
            buffer: q.watch_buffer,
            open: Mutex::new(Open::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a new watch by the caller who sent `authorization`, or
    /// RESOURCE_EXHAUSTED naming the limit reached.
    pub fn open(
        self: &Arc<Self>,
        authorization: Option<&str>,
        gauge: &prometheus_client::metrics::gauge::Gauge,
    ) -> Result<Slot, Status> {
        // The key itself, as authorisation reads it: `Bearer k` and `bearer k` are one key.
        let key = authorization
            .map(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
                    .unwrap_or(h)
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        let mut open = self.lock();
        if open.total >= self.max_streams {
            return Err(Status::resource_exhausted(format!(
                "too many watches open on this server (query.watch_max_streams = {}); retry later",
                self.max_streams
            )));
        }
        let mine = open.per_key.get(&key).copied().unwrap_or(0);
        if mine >= self.max_per_key {
            return Err(Status::resource_exhausted(format!(
                "this API key has {mine} watches open, the most allowed \
                 (query.watch_max_per_key); close one first"
            )));
        }
        open.total += 1;
        *open.per_key.entry(key.clone()).or_default() += 1;
        gauge.inc();
        Ok(Slot {
            watchers: self.clone(),
            key,
            gauge: gauge.clone(),
        })
    }

    /// The interval a watch asked for (0: the default), checked.
    pub fn interval(&self, interval_ms: u32) -> Result<Duration, Violations> {
        let ms = if interval_ms == 0 {
            self.default_interval_ms
        } else {
            interval_ms
        };
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&ms) {
            let mut bad = Violations::default();
            bad.push(
                Field::IntervalMs,
                Reason::OutOfRange,
                format!(
                    "interval_ms must be 0 (the server's default) or between {MIN_INTERVAL_MS} and {MAX_INTERVAL_MS} (got {interval_ms})"
                ),
            );
            return Err(bad);
        }
        Ok(Duration::from_millis(u64::from(ms)))
    }
}

/// What a watch sends: an answer, a heartbeat (`None`: nothing changed for
/// [`HEARTBEAT`]; the SSE mirror writes a comment so proxies keep the stream open, gRPC
/// drops it), or the status that ends it.
pub type Update<T> = Result<Option<T>, Status>;

/// Silence after which a watch sends a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// Starts a watch: `ask(now_ms)` every `interval`, each changed answer sent into the
/// returned channel (the first one at once). The watch holds `slot` until it ends.
/// `first` is the answer already computed when the watch was opened (so an invalid query
/// is refused before anything streams).
pub fn spawn<T, F, Fut>(
    api: &Api,
    rpc: &'static str,
    slot: Slot,
    interval: Duration,
    first: T,
    mut ask: F,
) -> mpsc::Receiver<Update<T>>
where
    T: PartialEq + Clone + Send + 'static,
    F: FnMut(i64) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, BackendError>> + Send,
{
    let buffer = slot.watchers.buffer;
    // One slot more than the buffer: the goodbye of a client that fell behind.
    let (tx, rx) = mpsc::channel(buffer + 1);
    let api = api.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let mut last = first.clone();
        if tx.try_send(Ok(Some(first))).is_err() {
            return;
        }
        let mut sent = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tx.closed() => return,
            }
            let started = std::time::Instant::now();
            let answer = ask(crate::view::now_ms()).await;
            api.observe(rpc, started, answer.as_ref().err());
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    let _ = tx.try_send(Err(e.into_status()));
                    return;
                }
            };
            if answer == last {
                // A heartbeat only into a free slot: it never counts against the client.
                if sent.elapsed() >= HEARTBEAT && tx.capacity() > 1 && tx.try_send(Ok(None)).is_ok()
                {
                    sent = tokio::time::Instant::now();
                }
                continue;
            }
            // Only the goodbye slot left: the client has `buffer` updates unread.
            if tx.capacity() <= 1 {
                api.metrics.refuse_query(rpc, "fell_behind");
                let _ = tx.try_send(Err(Status::resource_exhausted(format!(
                    "watch dropped: {buffer} updates were left unread; read updates as they \
                     come (or ask for a longer interval_ms) and watch again"
                ))));
                return;
            }
            if tx.try_send(Ok(Some(answer.clone()))).is_err() {
                return;
            }
            sent = tokio::time::Instant::now();
            last = answer;
        }
    });
    rx
}
