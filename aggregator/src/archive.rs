//! The raw click archive's feed from this aggregator (`[archive]`): the archive writer
//! (`adclick_archive::Archiver`, its own thread) reads the WAL *behind* the apply path.
//!
//! - The writer thread applies a batch, then records what became of each of its clicks
//!   (counted, late, duplicate, too old, malformed, owner mismatch) in the store's
//!   `archive_outcome` table (a cheap non-durable commit: the next WAL append or
//!   checkpoint makes it durable; a crash before that replays the batch, which records the
//!   same outcomes again: replay reproduces the state, so it reproduces the decisions).
//! - [`WalFeed`] turns WAL entries that have outcomes into archive rows.
//! - The archive's progress (`covered`, plus the generation being published) lives in the
//!   same store, and a checkpoint deletes the WAL only up to `covered`: after any crash the
//!   archive reads again from `covered`, and every entry after it is still there with its
//!   outcomes (positions up to the checkpoint were recorded before the checkpoint's durable
//!   commit; later ones are replayed). So a crash can neither lose rows nor, with the
//!   writer's redo of an interrupted generation, duplicate them.
//!
//! Client IPs are written in the form `[privacy] ip_storage` asks for (`crate::privacy`:
//! full, truncated, or hashed with the event day's salt), by the same masker as the click
//! index's; rows regenerated after a crash get the same values.
//!
//! The cost on the apply path is one outcome byte string per batch (a few bytes: only the
//! clicks not plainly counted are listed) and one non-durable commit per group; decoding
//! and Parquet encoding happen on the archive thread (BENCHMARKS.md, "Archive").

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use adclick_archive::{
    ArchiveConfig, ArchiveError, Archiver, Destination, Feed, Row, State, Stats, Status,
};
use adclick_proto::v1::IngestBatch;
use prost::Message;

use crate::privacy::IpMasker;
use crate::store::ArchiveLog;

/// Version byte that starts an outcome string without a rules version (rules off, and
/// every string written before issue 16's version column).
const OUTCOME_V1: u8 = 1;
/// Version byte of an outcome string that names the rules version its clicks were
/// classified under and lists the earlier clicks the batch moved to invalid:
/// `[2, len, version bytes..., varint moves, moves..., entries...]`, a move being
/// `varint pos, varint index, code, varint ad, varint advertiser, varint campaign,
/// zigzag varint event time`.
const OUTCOME_V2: u8 = 2;
/// Longest rules version an outcome string carries (a version is a short hash; a longer
/// one is cut, never a reason to fail a batch).
const MAX_VERSION_LEN: usize = 64;
/// The outcome of a WAL entry that did not decode at replay (skipped, nothing counted).
pub const OUTCOME_UNDECODABLE: &[u8] = &[0xFF];

/// Builds one batch's outcome string: the clicks not plainly counted, as (index, code),
/// and the moves this batch made.
#[derive(Debug, Default)]
pub struct OutcomeBuilder {
    head: Vec<u8>,
    moves: Vec<u8>,
    n_moves: u32,
    buf: Vec<u8>,
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn get_varint(rest: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    let mut shift = 0u32;
    loop {
        let (&b, r) = rest.split_first()?;
        *rest = r;
        v |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

/// A click an earlier batch counted as valid that this batch's clicks moved to invalid
/// (a rate rule tripping, a honeypot's look-back): archived as a `moved` row naming the
/// click's own row by (`log_pos`, `click_index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoveRecord {
    /// WAL position of the moved click's batch (0: unknown).
    pub pos: u64,
    /// Its index in that batch.
    pub index: u32,
    /// `Status::Moved*`: the rule.
    pub status: Status,
    /// Its ad, advertiser and campaign.
    pub ad: u64,
    /// See `ad`.
    pub advertiser: u64,
    /// See `ad`.
    pub campaign: u64,
    /// Its event time (the archive partition).
    pub event_time_ms: i64,
}

impl OutcomeBuilder {
    /// Starts a batch whose clicks the rules stage classifies under `rules_version`
    /// (`None`: the rules are off, so there is no classification to attribute).
    pub fn begin(&mut self, rules_version: Option<&str>) {
        self.head.clear();
        self.moves.clear();
        self.n_moves = 0;
        self.buf.clear();
        match rules_version {
            None => self.head.push(OUTCOME_V1),
            Some(v) => {
                let mut end = v.len().min(MAX_VERSION_LEN);
                while !v.is_char_boundary(end) {
                    end -= 1;
                }
                let v = &v.as_bytes()[..end];
                self.head.push(OUTCOME_V2);
                self.head.push(v.len() as u8);
                self.head.extend_from_slice(v);
            }
        }
    }

    /// Records that this batch moved an earlier click to invalid (only with a rules
    /// version: the rules are on).
    pub fn push_move(&mut self, m: &MoveRecord) {
        if self.head.first() != Some(&OUTCOME_V2) {
            return;
        }
        put_varint(&mut self.moves, m.pos);
        put_varint(&mut self.moves, u64::from(m.index));
        self.moves.push(m.status as u8);
        put_varint(&mut self.moves, m.ad);
        put_varint(&mut self.moves, m.advertiser);
        put_varint(&mut self.moves, m.campaign);
        let t = m.event_time_ms;
        put_varint(&mut self.moves, ((t << 1) ^ (t >> 63)) as u64);
        self.n_moves += 1;
    }

    /// Click `index` of the batch had `status` (plain `Counted` is implied, not stored).
    pub fn push(&mut self, index: u32, status: Status) {
        if status == Status::Counted {
            return;
        }
        put_varint(&mut self.buf, u64::from(index));
        self.buf.push(status as u8);
    }

    /// The batch's outcome string.
    pub fn finish(&self) -> Vec<u8> {
        let mut out = self.head.clone();
        if self.head.first() == Some(&OUTCOME_V2) {
            put_varint(&mut out, u64::from(self.n_moves));
            out.extend_from_slice(&self.moves);
        }
        out.extend_from_slice(&self.buf);
        out
    }
}

/// What one outcome string says about its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcomes {
    /// The rules version the clicks were classified under (`None`: rules off).
    pub rules_version: Option<Arc<str>>,
    /// A status per click index.
    pub status: Vec<Status>,
    /// The earlier clicks this batch moved to invalid.
    pub moves: Vec<MoveRecord>,
}

/// The archive's record of a rules move.
pub fn move_record(m: &crate::rules::Moved) -> MoveRecord {
    use crate::rules::Reason;
    MoveRecord {
        pos: m.origin.pos,
        index: m.origin.index,
        status: match m.reason {
            Reason::IpRate => Status::MovedIpRate,
            Reason::UserRate => Status::MovedUserRate,
            // Only the rate rules and the honeypot move clicks.
            _ => Status::MovedHoneypot,
        },
        ad: m.click.ad,
        advertiser: m.click.advertiser,
        campaign: m.click.campaign,
        event_time_ms: m.click.event_time_ms,
    }
}

/// Decodes an outcome string (`n` clicks). `None`: the entry was undecodable at replay,
/// or the string is damaged.
pub fn decode_outcomes(o: &[u8], n: usize) -> Option<Outcomes> {
    let (&v, mut rest) = o.split_first()?;
    let mut moves = Vec::new();
    let rules_version = match v {
        OUTCOME_V1 => None,
        OUTCOME_V2 => {
            let (&len, r) = rest.split_first()?;
            let (name, r) = r.split_at_checked(usize::from(len))?;
            rest = r;
            let n_moves = get_varint(&mut rest)?;
            for _ in 0..n_moves {
                let pos = get_varint(&mut rest)?;
                let index = u32::try_from(get_varint(&mut rest)?).ok()?;
                let (&code, r) = rest.split_first()?;
                rest = r;
                let status = Status::from_code(code).filter(|s| s.is_move())?;
                let ad = get_varint(&mut rest)?;
                let advertiser = get_varint(&mut rest)?;
                let campaign = get_varint(&mut rest)?;
                let z = get_varint(&mut rest)?;
                let event_time_ms = ((z >> 1) as i64) ^ -((z & 1) as i64);
                moves.push(MoveRecord {
                    pos,
                    index,
                    status,
                    ad,
                    advertiser,
                    campaign,
                    event_time_ms,
                });
            }
            Some(Arc::from(std::str::from_utf8(name).ok()?))
        }
        _ => return None,
    };
    let mut out = vec![Status::Counted; n];
    while !rest.is_empty() {
        let idx = get_varint(&mut rest)?;
        let (&code, r) = rest.split_first()?;
        rest = r;
        let status = Status::from_code(code).filter(|s| !s.is_move())?;
        *out.get_mut(usize::try_from(idx).ok()?)? = status;
    }
    Some(Outcomes {
        rules_version,
        status: out,
        moves,
    })
}

/// Wakes the archive thread when outcomes were recorded.
#[derive(Debug, Default)]
pub struct Signal {
    recorded: Mutex<u64>,
    cv: Condvar,
}

impl Signal {
    /// Outcomes up to `pos` are recorded.
    pub fn notify(&self, pos: u64) {
        let mut r = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        if pos > *r {
            *r = pos;
            self.cv.notify_all();
        }
    }

    fn wait(&self, after: u64, timeout: Duration) {
        let r = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        if *r > after {
            return;
        }
        let _ = self.cv.wait_timeout(r, timeout);
    }
}

/// The WAL (with outcomes) as an archive [`Feed`].
#[derive(Debug)]
pub struct WalFeed {
    log: ArchiveLog,
    signal: Arc<Signal>,
    /// Where the archive starts when it has no state yet (the checkpoint's position).
    start: u64,
    /// Set by `Aggregator::kill`: the feed fails everything, as a dead process would.
    killed: Arc<AtomicBool>,
    /// The stored form of client IPs (`[privacy]`).
    ips: Arc<IpMasker>,
}

fn store_err(e: crate::store::StoreError) -> ArchiveError {
    ArchiveError(e.to_string())
}

impl WalFeed {
    /// The feed over `log`.
    pub fn new(
        log: ArchiveLog,
        signal: Arc<Signal>,
        start: u64,
        killed: Arc<AtomicBool>,
        ips: Arc<IpMasker>,
    ) -> Self {
        WalFeed {
            log,
            signal,
            start,
            killed,
            ips,
        }
    }

    fn check(&self) -> Result<(), ArchiveError> {
        if self.killed.load(Ordering::Acquire) {
            return Err(ArchiveError("aggregator killed".into()));
        }
        Ok(())
    }
}

/// The rows of one WAL entry (`Err`: it does not decode, or its outcomes do not match it).
pub fn rows_of(
    pos: u64,
    batch: &[u8],
    outcomes: &[u8],
    ips: &IpMasker,
    out: &mut Vec<Row>,
) -> Result<(), String> {
    if outcomes == OUTCOME_UNDECODABLE {
        return Err("undecodable at replay (nothing of it was counted)".into());
    }
    let b = IngestBatch::decode(batch).map_err(|e| e.to_string())?;
    let Outcomes {
        rules_version,
        status,
        moves,
    } = decode_outcomes(outcomes, b.clicks.len())
        .ok_or_else(|| "outcomes do not match the batch".to_string())?;
    let collector: Arc<str> = Arc::from(b.collector_id.as_str());
    for (i, (c, st)) in b.clicks.into_iter().zip(status).enumerate() {
        let client_ip: Option<IpAddr> = ips
            .mask_wire(&c.client_ip, c.event_time_ms)
            .unwrap_or_else(|e| {
                // Never the full address against the configuration: the row says unknown.
                tracing::error!(pos, error = %e, "archive: client IP not stored (privacy salt unavailable)");
                None
            });
        out.push(Row {
            log_pos: pos,
            collector_id: collector.clone(),
            collector_seq: b.seq,
            click_index: u32::try_from(i).unwrap_or(u32::MAX),
            impression_id: c.impression_id,
            ad_id: c.ad_id,
            advertiser_id: c.advertiser_id,
            campaign_id: c.campaign_id,
            token_expires_at_ms: c.token_expires_at_ms,
            event_time_ms: c.event_time_ms,
            received_at_ms: c.received_at_ms,
            occurred_at_ms: c.occurred_at_ms,
            sent_at_ms: c.sent_at_ms,
            country: c.country,
            device: c.device,
            os: c.os,
            site: c.site,
            app: c.app,
            user_id: c.user_id,
            client_ip,
            clock_skew_flagged: c.clock_skew_flagged,
            dedup_suspect: c.dedup_suspect,
            salt: c.salt,
            status: st,
            rules_version: rules_version.clone(),
        });
    }
    // The clicks this batch moved: one row each, naming the click's own row.
    let none: Arc<str> = Arc::from("");
    for m in moves {
        out.push(Row {
            log_pos: m.pos,
            collector_id: none.clone(),
            collector_seq: 0,
            click_index: m.index,
            impression_id: Vec::new(),
            ad_id: m.ad,
            advertiser_id: m.advertiser,
            campaign_id: m.campaign,
            token_expires_at_ms: 0,
            event_time_ms: m.event_time_ms,
            received_at_ms: 0,
            occurred_at_ms: 0,
            sent_at_ms: 0,
            country: String::new(),
            device: 0,
            os: String::new(),
            site: String::new(),
            app: String::new(),
            user_id: String::new(),
            client_ip: None,
            clock_skew_flagged: false,
            dedup_suspect: false,
            salt: 0,
            status: m.status,
            rules_version: rules_version.clone(),
        });
    }
    Ok(())
}

impl Feed for WalFeed {
    fn read(
        &mut self,
        after: u64,
        until: u64,
        max_rows: usize,
        out: &mut Vec<Row>,
    ) -> Result<u64, ArchiveError> {
        self.check()?;
        let start = out.len();
        self.log
            .read(after, until, &mut |pos, batch, outcomes| {
                if let Err(e) = rows_of(pos, batch, outcomes, &self.ips, out) {
                    // Damage the engine skipped too (redb checksums its pages: this is not
                    // expected); logged with its position for a reconciliation.
                    tracing::error!(pos, error = %e, "archive: WAL entry skipped");
                }
                out.len() - start < max_rows
            })
            .map_err(store_err)
    }

    fn wait(&self, after: u64, timeout: Duration) {
        self.signal.wait(after, timeout);
    }

    fn load_state(&mut self) -> Result<State, ArchiveError> {
        self.check()?;
        Ok(self.log.load_state().map_err(store_err)?.unwrap_or(State {
            covered: self.start,
            next_seq: 0,
            pending: None,
        }))
    }

    fn save_state(&mut self, state: &State) -> Result<(), ArchiveError> {
        self.check()?;
        self.log.save_state(state).map_err(store_err)
    }
}

/// The running archive thread.
#[derive(Debug)]
pub struct ArchiveThread {
    stop: Arc<AtomicBool>,
    killed: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
    /// Its counters.
    pub stats: Arc<Stats>,
}

impl ArchiveThread {
    /// Stops after archiving everything recorded (call after the engine's writer ended).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.handle.join();
    }

    /// Stops at once, publishing nothing more (a simulated crash), and waits for the
    /// thread to end: a dead process runs nothing, and a restart on the same directory
    /// must not meet this thread still publishing.
    pub fn kill(self) {
        self.killed.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        let _ = self.handle.join();
    }
}

/// Opens the destination and starts the archive thread on `log`.
pub fn spawn(
    cfg: &ArchiveConfig,
    data_dir: &std::path::Path,
    log: ArchiveLog,
    signal: Arc<Signal>,
    start: u64,
    ips: Arc<IpMasker>,
) -> Result<ArchiveThread, ArchiveError> {
    let stats = Arc::new(Stats::default());
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let feed = WalFeed::new(log, signal, start, killed.clone(), ips);
    let st = stop.clone();
    let thread_stats = stats.clone();
    let nice = cfg.nice;
    let cfg = cfg.clone();
    let staging = data_dir.join("archive-staging");
    // The destination (an S3 one owns a tokio runtime) is built and dropped on the archive
    // thread, never in the caller's async context; its opening error still fails the start.
    let (opened_tx, opened) = std::sync::mpsc::sync_channel::<Result<(), ArchiveError>>(1);
    let handle = std::thread::Builder::new()
        .name("adclick-archive".into())
        .spawn(move || {
            let archiver = match Destination::open(&cfg, &staging)
                .and_then(|dest| Archiver::new(feed, cfg.clone(), dest, thread_stats.clone()))
            {
                Ok(a) => {
                    let _ = opened_tx.send(Ok(()));
                    a
                }
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                    return;
                }
            };
            if nice > 0 {
                crate::lower_thread_priority(nice, "archive");
            }
            if let Err(e) = archiver.run(&st) {
                tracing::error!(error = %e, "archive writer stopped; restart the aggregator to resume (nothing is lost: the WAL is kept)");
            }
            let cpu = crate::benchkit::thread_cpu_seconds();
            thread_stats
                .thread_cpu_us
                .store((cpu * 1e6) as u64, Ordering::Relaxed);
        })
        .map_err(|e| ArchiveError(format!("archive thread: {e}")))?;
    match opened.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = handle.join();
            return Err(e);
        }
        Err(_) => {
            let _ = handle.join();
            return Err(ArchiveError(
                "archive thread ended before it started".into(),
            ));
        }
    }
    Ok(ArchiveThread {
        stop,
        killed,
        handle,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip() {
        let mut b = OutcomeBuilder::default();
        b.begin(None);
        b.push(0, Status::Counted);
        b.push(1, Status::Duplicate);
        b.push(300, Status::CountedLate);
        b.push(301, Status::OwnerMismatch);
        let o = b.finish();
        let d = decode_outcomes(&o, 302).unwrap();
        assert_eq!(d.rules_version, None);
        let d = d.status;
        assert_eq!(d[0], Status::Counted);
        assert_eq!(d[1], Status::Duplicate);
        assert_eq!(d[2], Status::Counted);
        assert_eq!(d[300], Status::CountedLate);
        assert_eq!(d[301], Status::OwnerMismatch);
        // An index past the batch, a bad code or a bad version is damage.
        assert_eq!(decode_outcomes(&o, 300), None);
        assert_eq!(decode_outcomes(&[OUTCOME_V1, 0, 99], 1), None);
        assert_eq!(decode_outcomes(&[7], 1), None);
        assert_eq!(decode_outcomes(OUTCOME_UNDECODABLE, 1), None);
        b.begin(None);
        assert_eq!(
            decode_outcomes(&b.finish(), 3).unwrap().status,
            vec![Status::Counted; 3]
        );
    }

    /// The rules version rides with the statuses it applies to; a cut or lying length is
    /// damage, not a panic.
    #[test]
    fn outcomes_carry_the_rules_version() {
        let mut b = OutcomeBuilder::default();
        b.begin(Some("r-1a2b3c"));
        b.push(1, Status::InvalidIpRate);
        let o = b.finish();
        let d = decode_outcomes(&o, 2).unwrap();
        assert_eq!(d.rules_version.as_deref(), Some("r-1a2b3c"));
        assert_eq!(d.status, vec![Status::Counted, Status::InvalidIpRate]);
        for cut in 1..o.len() - 2 {
            assert_eq!(decode_outcomes(&o[..cut], 2), None, "cut at {cut}");
        }
        // Moves ride with the version, in the order pushed, and need one.
        b.begin(Some("r-1"));
        let mv = |pos: u64, status, t: i64| MoveRecord {
            pos,
            index: 7,
            status,
            ad: 1 << 40,
            advertiser: 2,
            campaign: 3,
            event_time_ms: t,
        };
        b.push_move(&mv(9, Status::MovedIpRate, 1_767_225_600_000));
        b.push_move(&mv(u64::MAX, Status::MovedHoneypot, -5));
        b.push(0, Status::InvalidIpRate);
        let o = b.finish();
        let d = decode_outcomes(&o, 1).unwrap();
        assert_eq!(
            d.moves,
            vec![
                mv(9, Status::MovedIpRate, 1_767_225_600_000),
                mv(u64::MAX, Status::MovedHoneypot, -5)
            ]
        );
        assert_eq!(d.status, vec![Status::InvalidIpRate]);
        for cut in 1..o.len() - 2 {
            assert_eq!(decode_outcomes(&o[..cut], 1), None, "cut at {cut}");
        }
        b.begin(None);
        b.push_move(&mv(9, Status::MovedIpRate, 0));
        assert_eq!(decode_outcomes(&b.finish(), 0).unwrap().moves, vec![]);
        let long = "v".repeat(300);
        b.begin(Some(&long));
        let d = decode_outcomes(&b.finish(), 0).unwrap();
        assert_eq!(d.rules_version.as_deref(), Some(&long[..MAX_VERSION_LEN]));
        // Cut on a character boundary: the string stays decodable.
        let wide = format!("a{}", "é".repeat(40));
        b.begin(Some(&wide));
        let d = decode_outcomes(&b.finish(), 0).unwrap();
        assert_eq!(
            d.rules_version.as_deref(),
            Some(&wide[..MAX_VERSION_LEN - 1])
        );
    }
}
