//! Per-click processing, shared by every ingest path (HTTP batches, redirects, QUIC):
//! dimension checks, token verification, clock correction and dedup, producing the
//! `IngestClick`s to spool plus the counted, quarantinable rejections.
//!
//! Must not do I/O: the caller commits the accepted clicks and, if that fails, calls
//! [`Processor::release`] so a client retry is not mistaken for a duplicate.

pub mod correct;
pub mod dedup;
pub mod keys;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use adclick_proto::countable;
use adclick_proto::v1::{self, ClickBatchResult, IngestClick};
use prost::Message;

use crate::config::{DedupConfig, TokenChecks};
use crate::metrics::Metrics;
use crate::quarantine::Rejected;
use crate::routing::HotAds;
use dedup::{Dedup, Seen};
use keys::KeySource;

/// Where and when a request arrived.
#[derive(Debug, Clone, Copy)]
pub struct RequestCtx {
    /// Collector clock at arrival.
    pub received_at_ms: i64,
    /// Client address.
    pub client_ip: Option<IpAddr>,
    /// The request's User-Agent class (`useragent`), forwarded with each of its clicks.
    pub ua_class: v1::UserAgentClass,
}

/// The result of processing one batch.
#[derive(Debug, Default)]
pub struct Processed {
    /// Verified, corrected, first-seen clicks (to be made durable).
    pub accepted: Vec<IngestClick>,
    /// Clicks dropped as duplicates.
    pub duplicates: u32,
    /// Clicks refused, with reasons.
    pub rejected: Vec<Rejected>,
}

impl Processed {
    /// The per-batch answer for the client.
    pub fn result(&self) -> ClickBatchResult {
        let mut r = ClickBatchResult {
            accepted: u32::try_from(self.accepted.len()).unwrap_or(u32::MAX),
            duplicate: self.duplicates,
            rejected: Default::default(),
        };
        for x in &self.rejected {
            *r.rejected.entry(x.reason.to_string()).or_default() += 1;
        }
        r
    }

    /// The accepted clicks encoded as `IngestBatch.clicks` entries (field 3), ready to be
    /// concatenated into a spool record.
    pub fn encode_accepted(&self) -> Vec<u8> {
        let len: usize = self
            .accepted
            .iter()
            .map(|c| {
                let l = c.encoded_len();
                1 + prost::encoding::encoded_len_varint(l as u64) + l
            })
            .sum();
        let mut buf = Vec::with_capacity(len);
        for c in &self.accepted {
            prost::encoding::message::encode(3, c, &mut buf);
        }
        buf
    }
}

/// Verifies, corrects and dedups clicks. Shared by all request handlers.
#[derive(Debug)]
pub struct Processor {
    keys: Arc<KeySource>,
    checks: TokenChecks,
    max_string_len: usize,
    dedup: Mutex<Dedup>,
    hot: Arc<HotAds>,
    metrics: Arc<Metrics>,
}

fn truncate(s: &str, n: usize) -> String {
    let mut end = s.len().min(n);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl Processor {
    /// A processor over the given keys and dedup settings.
    pub fn new(
        keys: Arc<KeySource>,
        checks: TokenChecks,
        dedup: &DedupConfig,
        max_string_len: usize,
        hot: Arc<HotAds>,
        metrics: Arc<Metrics>,
        now_ms: i64,
    ) -> Self {
        Processor {
            keys,
            dedup: Mutex::new(Dedup::new(dedup, checks.skew_ms, now_ms)),
            checks,
            max_string_len,
            hot,
            metrics,
        }
    }

    fn check_dims(&self, c: &v1::Click) -> Result<(), &'static str> {
        let country_ok = c.country.is_empty()
            || (c.country.len() == 2 && c.country.bytes().all(|b| b.is_ascii_uppercase()));
        if !country_ok {
            return Err("country must be empty or an upper-case ISO-3166 alpha-2 code");
        }
        if v1::Device::try_from(c.device).is_err() {
            return Err("unknown device value");
        }
        let max = self.max_string_len;
        if [&c.os, &c.site, &c.app, &c.user_id]
            .iter()
            .any(|s| s.len() > max)
        {
            return Err("a dimension string exceeds limits.max_string_len");
        }
        Ok(())
    }

    /// Processes a batch's clicks.
    pub fn process(&self, clicks: Vec<v1::Click>, ctx: &RequestCtx) -> Processed {
        let ring = self.keys.get();
        let now = ctx.received_at_ms;
        let mut out = Processed::default();
        let mut verified = Vec::with_capacity(clicks.len());
        for click in clicks {
            let reject = |reason: &'static str, detail: String| Rejected {
                reason,
                detail,
                token: truncate(&click.token, 256),
                occurred_at_ms: click.occurred_at_ms,
                sent_at_ms: click.sent_at_ms,
            };
            if let Err(why) = self.check_dims(&click) {
                out.rejected
                    .push(reject("invalid_dimension", why.to_string()));
                continue;
            }
            match ring.verify(&click.token, now, self.checks.skew_ms) {
                Ok(imp) => verified.push((click, imp)),
                Err(e) => out.rejected.push(reject(e.reason(), e.to_string())),
            }
        }
        let mut skewed = 0;
        let mut suspects = 0;
        {
            // Repeats inside this batch are plain duplicates: both copies would be in the
            // same all-or-nothing commit. Repeats of another request's pending click are
            // suspects (see `Dedup`).
            let mut in_batch = std::collections::HashSet::with_capacity(verified.len());
            let mut dedup = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
            for (click, imp) in verified {
                if !in_batch.insert(imp.impression_id) {
                    out.duplicates += 1;
                    continue;
                }
                let c = correct::correct(
                    click.occurred_at_ms,
                    click.sent_at_ms,
                    now,
                    imp.issued_at_ms,
                    self.checks.max_device_clock_skew_ms,
                );
                // The one countable rule the aggregators apply too: refuse here, where the
                // client still hears about it, anything they would not count (a token
                // living past the maximum lifetime, an implausible event time, a click
                // older than the retention), instead of acking it to be dropped downstream.
                if let Err(why) = countable::check_at_edge(
                    imp.issued_at_ms,
                    imp.expires_at_ms,
                    c.event_time_ms,
                    now,
                    self.checks.max_click_age_ms,
                ) {
                    out.rejected.push(Rejected {
                        reason: why.reason(),
                        detail: why.to_string(),
                        token: truncate(&click.token, 256),
                        occurred_at_ms: click.occurred_at_ms,
                        sent_at_ms: click.sent_at_ms,
                    });
                    continue;
                }
                let seen = dedup.check_and_insert(&imp.impression_id, imp.expires_at_ms, now);
                if seen == Seen::Duplicate {
                    out.duplicates += 1;
                    continue;
                }
                skewed += u64::from(c.skew_flagged);
                suspects += u64::from(seen == Seen::Suspect);
                out.accepted.push(IngestClick {
                    impression_id: imp.impression_id.to_vec(),
                    ad_id: imp.ad_id,
                    advertiser_id: imp.advertiser_id,
                    campaign_id: imp.campaign_id,
                    token_expires_at_ms: imp.expires_at_ms,
                    event_time_ms: c.event_time_ms,
                    received_at_ms: now,
                    occurred_at_ms: click.occurred_at_ms,
                    sent_at_ms: click.sent_at_ms,
                    country: click.country,
                    device: click.device,
                    os: click.os,
                    site: click.site,
                    app: click.app,
                    user_id: click.user_id,
                    client_ip: match ctx.client_ip {
                        Some(IpAddr::V4(a)) => a.octets().to_vec(),
                        Some(IpAddr::V6(a)) => a.octets().to_vec(),
                        None => Vec::new(),
                    },
                    clock_skew_flagged: c.skew_flagged,
                    dedup_suspect: seen == Seen::Suspect,
                    salt: self.hot.salt(imp.ad_id, &imp.impression_id),
                    token_issued_at_ms: imp.issued_at_ms,
                    ua_class: ctx.ua_class as i32,
                });
            }
        }
        let m = &self.metrics;
        m.add_clicks("duplicate", u64::from(out.duplicates));
        m.clock_skew_flagged.inc_by(skewed);
        m.dedup_suspect.inc_by(suspects);
        let mut by_reason: Vec<(&'static str, u64)> = Vec::new();
        for r in &out.rejected {
            match by_reason.iter_mut().find(|(k, _)| *k == r.reason) {
                Some((_, n)) => *n += 1,
                None => by_reason.push((r.reason, 1)),
            }
        }
        for (reason, n) in by_reason {
            m.add_clicks(reason, n);
        }
        out
    }

    /// Verifies a redirect token and returns its landing URL (the only source of a
    /// redirect target).
    pub fn landing_url(
        &self,
        token: &str,
        now_ms: i64,
    ) -> Result<String, adclick_proto::TokenError> {
        self.keys
            .get()
            .verify(token, now_ms, self.checks.skew_ms)
            .map(|imp| imp.landing_url)
    }

    /// Marks the accepted clicks durable (repeats become duplicates) and counts them.
    pub fn committed(&self, p: &Processed) {
        let mut dedup = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
        for c in &p.accepted {
            if let Ok(id) = <[u8; 16]>::try_from(c.impression_id.as_slice()) {
                dedup.commit(&id);
            }
        }
        drop(dedup);
        self.metrics.add_clicks("accepted", p.accepted.len() as u64);
        let mut by_class = [0u64; 3];
        for c in &p.accepted {
            let i = usize::try_from(c.ua_class).unwrap_or(0).min(2);
            by_class[i] += 1;
        }
        self.metrics.add_ua_classes(by_class);
    }

    /// Forgets the accepted clicks of a batch that could not be made durable.
    pub fn release(&self, p: &Processed) {
        let mut dedup = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
        for c in &p.accepted {
            if let Ok(id) = <[u8; 16]>::try_from(c.impression_id.as_slice()) {
                dedup.release(&id);
            }
        }
    }
}
