//! Per-click processing, shared by every ingest path (HTTP batches, redirects, QUIC, the
//! file source): dimension checks, token verification, clock correction and dedup,
//! producing the accepted clicks' spool bytes plus the counted, quarantinable rejections.
//!
//! The per-click path allocates nothing for a valid click: clicks arrive borrowed from the
//! request body ([`ClickRef`], decoded by `http::decode`), tokens are verified on the stack
//! (`Keyring::verify_click`), and accepted clicks are encoded straight into the
//! `IngestBatch.clicks` bytes of the spool record ([`encode`]); only rejections (quarantine
//! text) allocate. Allocations are per batch (the output buffers).
//!
//! Must not do I/O: the caller commits the accepted clicks and, if that fails, calls
//! [`Processor::release`] so a client retry is not mistaken for a duplicate.

pub mod correct;
pub mod dedup;
pub mod encode;
pub mod keys;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use adclick_proto::countable;
use adclick_proto::token::Verified;
use adclick_proto::v1::{self, ClickBatchResult};

use crate::config::{DedupConfig, TokenChecks};
use crate::metrics::Metrics;
use crate::quarantine::Rejected;
use crate::routing::HotAds;
use dedup::{Dedup, IdHashBuilder, ImpressionId, Seen};
use encode::IngestClickRef;
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

/// A click as the SDK sent it (`adclick.v1.Click`), its strings borrowed from the request
/// body (or from a decoded `v1::Click`, see the `From` impl).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClickRef<'a> {
    /// The impression token text.
    pub token: &'a str,
    /// Device clock at the click.
    pub occurred_at_ms: i64,
    /// Device clock at send time.
    pub sent_at_ms: i64,
    /// ISO-3166 alpha-2 code (checked here).
    pub country: &'a str,
    /// `v1::Device` value (checked here).
    pub device: i32,
    /// Operating system.
    pub os: &'a str,
    /// Publisher site.
    pub site: &'a str,
    /// Publisher app.
    pub app: &'a str,
    /// Opaque user id.
    pub user_id: &'a str,
}

impl<'a> From<&'a v1::Click> for ClickRef<'a> {
    fn from(c: &'a v1::Click) -> Self {
        ClickRef {
            token: &c.token,
            occurred_at_ms: c.occurred_at_ms,
            sent_at_ms: c.sent_at_ms,
            country: &c.country,
            device: c.device,
            os: &c.os,
            site: &c.site,
            app: &c.app,
            user_id: &c.user_id,
        }
    }
}

/// The result of processing clicks: what to make durable, and what to tell the client.
#[derive(Debug, Default)]
pub struct Processed {
    /// The verified, corrected, first-seen clicks as `IngestBatch.clicks` entries
    /// (field 3), ready to be concatenated into a spool record.
    encoded: Vec<u8>,
    /// Their impression ids, in order (for [`Processor::committed`] / `release`).
    ids: Vec<ImpressionId>,
    /// Accepted clicks by `UserAgentClass` value (unspecified, client, bot).
    ua_classes: [u64; 3],
    /// Clicks dropped as duplicates.
    pub duplicates: u32,
    /// Clicks refused, with reasons.
    pub rejected: Vec<Rejected>,
}

impl Processed {
    /// Accepted clicks (to be made durable).
    pub fn accepted(&self) -> usize {
        self.ids.len()
    }

    /// The per-batch answer for the client.
    pub fn result(&self) -> ClickBatchResult {
        let mut r = ClickBatchResult {
            accepted: u32::try_from(self.accepted()).unwrap_or(u32::MAX),
            duplicate: self.duplicates,
            rejected: Default::default(),
        };
        for x in &self.rejected {
            *r.rejected.entry(x.reason.to_string()).or_default() += 1;
        }
        r
    }

    /// The accepted clicks as `IngestBatch.clicks` entries (field 3), ready to be
    /// concatenated into a spool record.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    /// The accepted clicks decoded back into wire messages (tests and tools; the ingest
    /// path uses the bytes).
    pub fn accepted_clicks(&self) -> Vec<v1::IngestClick> {
        use prost::Message;
        v1::IngestBatch::decode(self.encoded.as_slice())
            .map(|b| b.clicks)
            .unwrap_or_default()
    }

    /// Takes the encoded clicks out (the ids stay, for commit or release).
    pub fn take_encoded(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.encoded)
    }

    /// Appends `other`'s clicks and outcomes after this one's (the file source gathers
    /// lines into one commit).
    pub fn append(&mut self, other: Processed) {
        self.encoded.extend_from_slice(&other.encoded);
        self.ids.extend_from_slice(&other.ids);
        for (a, b) in self.ua_classes.iter_mut().zip(other.ua_classes) {
            *a += b;
        }
        self.duplicates += other.duplicates;
        self.rejected.extend(other.rejected);
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

/// A click that passed verification, and what the dedup pass decided for it.
struct Checked<'c, 'a> {
    click: &'c ClickRef<'a>,
    imp: Verified,
    /// Set for accepted clicks.
    accepted: Option<(correct::Corrected, Seen)>,
}

// Bytes of a typical encoded click (ids, times, short dimensions): sizes the output buffer
// so most batches never grow it.
const TYPICAL_ENTRY_LEN: usize = 120;

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

    fn check_dims(&self, c: &ClickRef<'_>) -> Result<(), &'static str> {
        let country_ok = c.country.is_empty()
            || (c.country.len() == 2 && c.country.bytes().all(|b| b.is_ascii_uppercase()));
        if !country_ok {
            return Err("country must be empty or an upper-case ISO-3166 alpha-2 code");
        }
        if v1::Device::try_from(c.device).is_err() {
            return Err("unknown device value");
        }
        let max = self.max_string_len;
        if [c.os, c.site, c.app, c.user_id]
            .iter()
            .any(|s| s.len() > max)
        {
            return Err("a dimension string exceeds limits.max_string_len");
        }
        Ok(())
    }

    /// Processes a batch's clicks.
    pub fn process(&self, clicks: &[ClickRef<'_>], ctx: &RequestCtx) -> Processed {
        let ring = self.keys.get();
        let now = ctx.received_at_ms;
        let mut out = Processed::default();
        let reject = |click: &ClickRef<'_>, reason: &'static str, detail: String| Rejected {
            reason,
            detail,
            token: truncate(click.token, 256),
            occurred_at_ms: click.occurred_at_ms,
            sent_at_ms: click.sent_at_ms,
        };
        // Verification (the HMAC) runs outside the dedup lock.
        let mut checked = Vec::with_capacity(clicks.len());
        for click in clicks {
            if let Err(why) = self.check_dims(click) {
                out.rejected
                    .push(reject(click, "invalid_dimension", why.to_string()));
                continue;
            }
            match ring.verify_click(click.token, now, self.checks.skew_ms) {
                Ok(imp) => checked.push(Checked {
                    click,
                    imp,
                    accepted: None,
                }),
                Err(e) => out.rejected.push(reject(click, e.reason(), e.to_string())),
            }
        }
        drop(ring);
        out.ids.reserve_exact(checked.len());
        let mut skewed = 0;
        let mut suspects = 0;
        {
            // Repeats inside this batch are plain duplicates: both copies would be in the
            // same all-or-nothing commit. Repeats of another request's pending click are
            // suspects (see `Dedup`).
            let mut in_batch =
                HashSet::with_capacity_and_hasher(checked.len(), IdHashBuilder::default());
            let mut dedup = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
            for ch in &mut checked {
                let (click, imp) = (ch.click, &ch.imp);
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
                    out.rejected
                        .push(reject(click, why.reason(), why.to_string()));
                    continue;
                }
                let seen = dedup.check_and_insert(&imp.impression_id, imp.expires_at_ms, now);
                if seen == Seen::Duplicate {
                    out.duplicates += 1;
                    continue;
                }
                skewed += u64::from(c.skew_flagged);
                suspects += u64::from(seen == Seen::Suspect);
                out.ids.push(imp.impression_id);
                ch.accepted = Some((c, seen));
            }
        }
        // Encoding runs outside the lock too.
        let ip_bytes: ([u8; 16], usize) = match ctx.client_ip {
            Some(IpAddr::V4(a)) => {
                let mut b = [0; 16];
                b[..4].copy_from_slice(&a.octets());
                (b, 4)
            }
            Some(IpAddr::V6(a)) => (a.octets(), 16),
            None => ([0; 16], 0),
        };
        let client_ip = &ip_bytes.0[..ip_bytes.1];
        out.encoded = Vec::with_capacity(out.ids.len() * TYPICAL_ENTRY_LEN);
        for ch in &checked {
            let Some((c, seen)) = ch.accepted else {
                continue;
            };
            let (click, imp) = (ch.click, &ch.imp);
            IngestClickRef {
                impression_id: &imp.impression_id,
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
                client_ip,
                clock_skew_flagged: c.skew_flagged,
                dedup_suspect: seen == Seen::Suspect,
                salt: self.hot.salt(imp.ad_id, &imp.impression_id),
                token_issued_at_ms: imp.issued_at_ms,
                ua_class: ctx.ua_class as i32,
            }
            .encode_entry(&mut out.encoded);
        }
        let class = usize::try_from(ctx.ua_class as i32).unwrap_or(0).min(2);
        out.ua_classes[class] += out.ids.len() as u64;
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
        for id in &p.ids {
            dedup.commit(id);
        }
        drop(dedup);
        self.metrics.add_clicks("accepted", p.ids.len() as u64);
        self.metrics.add_ua_classes(p.ua_classes);
    }

    /// Forgets the accepted clicks of a batch that could not be made durable.
    pub fn release(&self, p: &Processed) {
        let mut dedup = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
        for id in &p.ids {
            dedup.release(id);
        }
    }
}
