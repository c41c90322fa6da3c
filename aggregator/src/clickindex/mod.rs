//! The click index: every click the aggregator counted, by client IP and by user id, for
//! the `ip` and `user_id` query filters. Values of that cardinality cannot live in the
//! minute cells, so the index is a recent raw log kept beside them, in two tiers:
//!
//! - **chunks** (RAM): the clicks of one applied batch, sorted by IP and by user id when
//!   the batch is done (`Chunk`), published to queries at once (before the ack);
//! - **segments** (`<data_dir>/click_index/*.seg`, [`segment`]): at every checkpoint the
//!   chunks since the last segment are aggregated per (ip or user, minute, ad,
//!   combination), written to one immutable file (temp + fsync + rename + directory fsync)
//!   and dropped from RAM; also between checkpoints, as soon as the chunks hold more than
//!   `click_index.memory_bytes` (so RAM is bounded by bytes, not by the checkpoint
//!   interval times the click rate). A query binary-searches each segment of its range
//!   with positioned reads.
//!
//! Exactness: the writer pushes a click only when the window operator counted it
//! (`Routed::Apply`: after exact dedup, late clicks included, too-old and malformed ones
//! never), in WAL order, from the same path WAL replay takes.
//!
//! Crash safety: a segment is named by the WAL positions it covers, `(from, upto]` (`upto`
//! the last batch it holds), and every checkpoint first flushes a segment up to its own
//! position. A start keeps exactly
//! the segments with `upto <=` the checkpoint's position and deletes the others (written
//! for a checkpoint that did not commit): the WAL after the checkpoint still holds their
//! batches, and replay indexes them again. So the index always equals "every click counted
//! up to the checkpoint, plus the replayed ones": no loss, no double count.
//!
//! Coverage: the index holds what was counted since it existed. A data dir that already
//! had a checkpoint when the index first opened (an aggregator upgraded from a version
//! without it) records in [`SINCE_FILE`] the first minute every click of which is indexed;
//! `validate` refuses filtered ranges starting before it rather than answering a part.
//!
//! Retention: segments whose newest minute is more than `click_index.retention_minutes`
//! behind the watermark are deleted after each checkpoint (bounded disk); `validate`
//! refuses ranges reaching before that.
//!
//! Privacy (`[privacy] ip_storage`, `crate::privacy`): the writer stores each IP in its
//! configured form (full, truncated, hashed with the day's salt) and a snapshot turns a
//! probe's IP into the same form before it searches, so `ip` filters match what was
//! stored: one address matches its /24 or /48 when truncated; with hashed storage a filter
//! takes one address (a range is refused: hashes have no order).
//!
//! It must not know protobuf, the query API or the shards: it stores (ip, user, minute,
//! ad, combination) and answers [`Probe`]s with [`Hit`]s.

pub mod segment;

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::privacy::{IpMasker, IpStorage};
use crate::sketch::hll::hash_user_id;
pub use segment::{Segment, SegmentError};

/// Directory of the segments inside the data dir.
pub const DIR: &str = "click_index";

/// The file in [`DIR`] holding the epoch ms from which the index is complete (`-` for
/// "since the data dir's first click").
pub const SINCE_FILE: &str = "complete_since";

/// The epoch ms from which the index in `dir` holds every counted click, recording it on
/// the first open: `i64::MIN` for a data dir that had no checkpoint yet (every click it
/// counts is indexed, replay included), else `upgrade_floor()`, the first minute none of
/// whose clicks can have been counted before (the caller's: after the clock and the
/// newest event time seen).
pub fn complete_since(
    dir: &Path,
    cp_pos: u64,
    upgrade_floor: impl FnOnce() -> i64,
) -> Result<i64, SegmentError> {
    let path = dir.join(SINCE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let t = text.trim();
            if t == "-" {
                return Ok(i64::MIN);
            }
            return t.parse().map_err(|_| {
                SegmentError::io(
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{t:?} is not epoch milliseconds or \"-\""),
                    ),
                )
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SegmentError::io(&path, e)),
    }
    let since = if cp_pos == 0 {
        i64::MIN
    } else {
        upgrade_floor()
    };
    let text = if since == i64::MIN {
        "-\n".to_string()
    } else {
        format!("{since}\n")
    };
    std::fs::create_dir_all(dir).map_err(|e| SegmentError::io(dir, e))?;
    let tmp = dir.join(format!("{SINCE_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| SegmentError::io(&path, e))?;
    if since != i64::MIN {
        tracing::warn!(
            since,
            "the click index starts now on a data dir with earlier clicks: ip/user_id filters answer from this minute on"
        );
    }
    Ok(since)
}

/// An IP as the index keys it: IPv6, IPv4 as IPv4-mapped (`::ffff:a.b.c.d`).
pub type Ip = [u8; 16];

/// The 16-byte key of a client IP as sent on the wire (4 or 16 bytes); `None` for any
/// other length (unknown).
pub fn ip_key(wire: &[u8]) -> Option<Ip> {
    match wire.len() {
        16 => {
            let mut k = [0u8; 16];
            k.copy_from_slice(wire);
            Some(k)
        }
        4 => {
            let mut k = [0u8; 16];
            k[10] = 0xff;
            k[11] = 0xff;
            k[12..].copy_from_slice(wire);
            Some(k)
        }
        _ => None,
    }
}

/// The first 8 bytes of `user` as a big-endian integer, zero-padded: `a < b` implies
/// `user_prefix(a) <= user_prefix(b)` (byte order), so it sorts user ids without a
/// `memcmp` unless the prefixes tie.
fn user_prefix(user: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = user.len().min(8);
    b[..n].copy_from_slice(&user[..n]);
    u64::from_be_bytes(b)
}

/// One counted click in RAM.
#[derive(Debug, Clone, Copy)]
struct Rec {
    ip: Ip,
    /// Minute since the epoch.
    minute: u32,
    combo: u32,
    ad: u64,
    /// User id bytes in the chunk's arena.
    user_off: u32,
    user_len: u32,
    has_ip: bool,
}

/// The clicks of one applied batch: sorted by IP (clicks with one first), and by user.
#[derive(Debug, Default)]
pub struct Chunk {
    recs: Vec<Rec>,
    /// Indexes into `recs` of the clicks with a user id, sorted by user id.
    by_user: Vec<u32>,
    users: Vec<u8>,
    /// Clicks in `recs` with an IP.
    with_ip: usize,
    min_minute: u32,
    max_minute: u32,
}

impl Chunk {
    /// Heap bytes it holds (what [`IndexWriter::ram_bytes`] sums).
    fn heap_bytes(&self) -> usize {
        self.recs.capacity() * std::mem::size_of::<Rec>()
            + self.by_user.capacity() * std::mem::size_of::<u32>()
            + self.users.capacity()
    }

    fn user(&self, r: &Rec) -> &[u8] {
        let s = r.user_off as usize;
        &self.users[s..s + r.user_len as usize]
    }

    fn scan(&self, p: &Probe<'_>, f: &mut dyn FnMut(Hit)) {
        if self.max_minute < p.from_minute || self.min_minute >= p.to_minute {
            return;
        }
        let in_range = |r: &Rec| r.minute >= p.from_minute && r.minute < p.to_minute;
        let hit = |r: &Rec, user: &[u8]| Hit {
            ad: r.ad,
            minute: r.minute,
            combo: r.combo,
            count: 1,
            user: if user.is_empty() {
                0
            } else {
                hash_user_id(user)
            },
        };
        if let Some((lo, hi)) = p.ip {
            let ips = &self.recs[..self.with_ip];
            let start = ips.partition_point(|r| r.ip < lo);
            for r in ips[start..].iter().take_while(|r| r.ip <= hi) {
                let user = self.user(r);
                if in_range(r) && p.user.is_none_or(|u| u == user) {
                    f(hit(r, user));
                }
            }
        } else if let Some(u) = p.user {
            let start = self
                .by_user
                .partition_point(|&i| self.user(&self.recs[i as usize]) < u);
            for &i in &self.by_user[start..] {
                let r = &self.recs[i as usize];
                if self.user(r) != u {
                    break;
                }
                if in_range(r) {
                    f(hit(r, u));
                }
            }
        }
    }
}

/// What a query asks the index for: clicks of an IP range and/or a user in a minute range.
#[derive(Debug, Clone, Copy)]
pub struct Probe<'a> {
    /// Inclusive IP range (one address: lo == hi).
    pub ip: Option<(Ip, Ip)>,
    /// Exact user id.
    pub user: Option<&'a [u8]>,
    /// First minute (since the epoch).
    pub from_minute: u32,
    /// End minute (exclusive).
    pub to_minute: u32,
}

/// Clicks of one (ad, minute, combination, user) matching a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// Ad.
    pub ad: u64,
    /// Minute since the epoch.
    pub minute: u32,
    /// Dimension combination id.
    pub combo: u32,
    /// Clicks.
    pub count: u64,
    /// `hash_user_id` of the user id; 0: none.
    pub user: u64,
}

/// Chunks per sealed block of a [`ChunkList`].
const BLOCK: usize = 128;

/// The chunks since the last flush, oldest first: sealed blocks of [`BLOCK`] chunks
/// shared between snapshots, and an open tail. Publishing after each batch clones one
/// `Arc` per block plus the tail, not one per chunk: a 30 s checkpoint interval holds
/// thousands of chunks (one per applied batch), and cloning them all at every batch made
/// publishing quadratic in the interval (2% of the aggregator's CPU 10 s into it at
/// 150k clicks/s, growing).
#[derive(Debug, Default, Clone)]
struct ChunkList {
    blocks: Vec<Arc<[Arc<Chunk>]>>,
    tail: Vec<Arc<Chunk>>,
}

impl ChunkList {
    fn push(&mut self, c: Arc<Chunk>) {
        self.tail.push(c);
        if self.tail.len() >= BLOCK {
            let block: Arc<[Arc<Chunk>]> = std::mem::take(&mut self.tail).into();
            self.blocks.push(block);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<Chunk>> {
        self.blocks.iter().flat_map(|b| b.iter()).chain(&self.tail)
    }

    /// Drops the oldest `n` chunks (all of them when there are fewer).
    fn drop_first(&mut self, mut n: usize) {
        let whole = self
            .blocks
            .iter()
            .take_while(|b| {
                let all = n >= b.len();
                if all {
                    n -= b.len();
                }
                all
            })
            .count();
        self.blocks.drain(..whole);
        if n == 0 {
            return;
        }
        match self.blocks.first_mut() {
            // The cut falls inside the oldest block (`n` < its length).
            Some(b) => *b = b.get(n..).unwrap_or_default().into(),
            None => {
                self.tail.drain(..n.min(self.tail.len()));
            }
        }
    }
}

/// What queries read: the segments and the chunks since the last flush, replaced whole.
#[derive(Debug, Default)]
pub struct Snapshot {
    segments: Arc<Vec<Arc<Segment>>>,
    chunks: ChunkList,
    /// How IPs were stored (None: in full).
    masker: Option<Arc<IpMasker>>,
}

fn addr_of(k: &Ip) -> std::net::IpAddr {
    let v6 = std::net::Ipv6Addr::from(*k);
    v6.to_ipv4_mapped()
        .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
}

fn key_of(a: std::net::IpAddr) -> Ip {
    match a {
        std::net::IpAddr::V4(v) => ip_key(&v.octets()).unwrap_or([0; 16]),
        std::net::IpAddr::V6(v) => v.octets(),
    }
}

impl Snapshot {
    /// Calls `f` for every click matching `p` (in no particular order; one (ad, minute,
    /// combination, user) may come in several hits, to be summed).
    pub fn scan(&self, p: &Probe<'_>, f: &mut dyn FnMut(Hit)) -> Result<(), SegmentError> {
        if p.ip.is_none() && p.user.is_none() {
            return Ok(());
        }
        if let (Some((lo, hi)), Some(m)) = (p.ip, &self.masker) {
            let minute_ms = |m: u32| i64::from(m) * 60_000;
            let probes = m
                .probe(
                    addr_of(&lo),
                    addr_of(&hi),
                    minute_ms(p.from_minute),
                    minute_ms(p.to_minute.saturating_sub(1)),
                )
                .map_err(|e| SegmentError::Io {
                    path: PathBuf::from(crate::privacy::DIR),
                    source: std::io::Error::other(e.to_string()),
                })?
                .ok_or_else(|| {
                    SegmentError::Unsupported(
                        "an ip range cannot be matched with privacy.ip_storage = \"hashed\" \
                         (hashes have no order): filter on one address"
                            .into(),
                    )
                })?;
            for (lo, hi) in probes {
                let one = Probe {
                    ip: Some((key_of(lo), key_of(hi))),
                    ..*p
                };
                self.scan_stored(&one, f)?;
            }
            return Ok(());
        }
        self.scan_stored(p, f)
    }

    /// [`Snapshot::scan`] for a probe already in the stored form.
    fn scan_stored(&self, p: &Probe<'_>, f: &mut dyn FnMut(Hit)) -> Result<(), SegmentError> {
        for s in self.segments.iter() {
            s.scan(p, f)?;
        }
        for c in self.chunks.iter() {
            c.scan(p, f);
        }
        Ok(())
    }

    /// Segments on disk (tests, metrics).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

/// The published snapshot (queries load it without a lock).
pub type Shared = ArcSwap<Snapshot>;

/// What the writer and the flusher thread both update, under one lock, so that a
/// published snapshot never holds a flushed chunk twice (as chunk and in a segment) or
/// not at all.
#[derive(Debug, Default)]
struct Parts {
    segments: Arc<Vec<Arc<Segment>>>,
    chunks: ChunkList,
    /// Heap bytes of `chunks`.
    chunk_bytes: usize,
    masker: Option<Arc<IpMasker>>,
}

impl Parts {
    fn publish(&self, shared: &Shared) {
        shared.store(Arc::new(Snapshot {
            segments: self.segments.clone(),
            chunks: self.chunks.clone(),
            masker: self.masker.clone(),
        }));
    }
}

type Locked = Arc<Mutex<Parts>>;

fn lock(p: &Locked) -> std::sync::MutexGuard<'_, Parts> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// A segment being written by the flusher thread.
#[derive(Debug)]
struct InFlight {
    upto: u64,
    done: Receiver<Result<(), SegmentError>>,
}

/// The writer's side: builds chunks, hands them to a flusher thread as segments, drops old
/// segments. Owned by the engine's writer thread.
///
/// A flush runs off the writer thread (sorting and writing ~2.4M clicks per 30 s
/// checkpoint at 80k/s took ~1-3 s of CPU and fsync: inline, it stalled ingest): the
/// writer starts it when it takes a checkpoint and saves that checkpoint only once the
/// flush is done (`engine`), so the rule "segments up to the saved checkpoint" holds.
#[derive(Debug)]
pub struct IndexWriter {
    dir: PathBuf,
    shared: Arc<Shared>,
    parts: Locked,
    building: Chunk,
    /// WAL position the segments cover up to.
    flushed_pos: u64,
    in_flight: Option<InFlight>,
    /// How IPs are stored (None: in full).
    masker: Option<Arc<IpMasker>>,
}

impl IndexWriter {
    /// Opens the index in `dir` for a start from a checkpoint at WAL position `cp_pos`:
    /// segments covering positions after it (written for a checkpoint that did not commit)
    /// and temporary files are deleted, since the replay indexes those batches again.
    pub fn open(dir: &Path, cp_pos: u64) -> Result<(Self, Arc<Shared>), SegmentError> {
        std::fs::create_dir_all(dir).map_err(|e| SegmentError::io(dir, e))?;
        let mut segments = Vec::new();
        let mut flushed_pos = 0;
        let entries = std::fs::read_dir(dir).map_err(|e| SegmentError::io(dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| SegmentError::io(dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((from, upto)) = segment::parse_name(&name) else {
                if name.ends_with(".tmp") {
                    std::fs::remove_file(&path).map_err(|e| SegmentError::io(&path, e))?;
                }
                continue;
            };
            if upto > cp_pos {
                tracing::info!(file = %path.display(), upto, cp_pos, "click index segment after the checkpoint removed (replay rebuilds it)");
                std::fs::remove_file(&path).map_err(|e| SegmentError::io(&path, e))?;
                continue;
            }
            let seg = Segment::open(&path, from, upto)?;
            flushed_pos = flushed_pos.max(upto);
            segments.push(Arc::new(seg));
        }
        segments.sort_by_key(|s| s.upto());
        let parts = Parts {
            segments: Arc::new(segments),
            chunks: ChunkList::default(),
            chunk_bytes: 0,
            masker: None,
        };
        let shared = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        parts.publish(&shared);
        Ok((
            IndexWriter {
                dir: dir.to_path_buf(),
                shared: shared.clone(),
                parts: Arc::new(Mutex::new(parts)),
                building: Chunk::default(),
                flushed_pos: flushed_pos.min(cp_pos),
                in_flight: None,
                masker: None,
            },
            shared,
        ))
    }

    /// Stores IPs as `masker` says from now on (`[privacy] ip_storage`; set before the
    /// first click, by the engine at start) and tells queries.
    pub fn set_ip_storage(&mut self, masker: Arc<IpMasker>) {
        let m = (masker.mode() != IpStorage::Full).then_some(masker);
        self.masker = m.clone();
        let mut p = lock(&self.parts);
        p.masker = m;
        p.publish(&self.shared);
    }

    /// Records one counted click (no allocation beyond amortised growth of the batch's
    /// buffers). `ip`: the wire bytes (4, 16, or anything else for unknown).
    pub fn push(&mut self, ad: u64, event_time_ms: i64, combo: u32, ip: &[u8], user: &[u8]) {
        let minute = u32::try_from(event_time_ms.div_euclid(60_000)).unwrap_or(u32::MAX);
        let key = match &self.masker {
            None => ip_key(ip),
            Some(m) => match m.mask_wire(ip, event_time_ms) {
                Ok(a) => a.map(key_of),
                Err(e) => {
                    // Never store the full address against the configuration: unknown.
                    tracing::error!(error = %e, "click index: IP not stored (privacy salt unavailable)");
                    None
                }
            },
        };
        let b = &mut self.building;
        let user_off = u32::try_from(b.users.len()).unwrap_or(u32::MAX);
        b.users.extend_from_slice(user);
        b.recs.push(Rec {
            ip: key.unwrap_or([0; 16]),
            minute,
            combo,
            ad,
            user_off,
            user_len: u32::try_from(user.len()).unwrap_or(0),
            has_ip: key.is_some(),
        });
    }

    /// Ends the batch: sorts its chunk and publishes it (before the batch is acked).
    pub fn end_batch(&mut self) {
        if self.building.recs.is_empty() {
            return;
        }
        // The next batch's buffers are sized like this one's (plus 1/8), so they do not
        // grow by doubling (each step a copy, and fresh pages the kernel zeroes: that
        // churn was ~10% of the apply path's time with the index on). They are held from
        // now until the next batch, outside `ram_bytes` (one batch's records, as before
        // while a batch was being built).
        let (recs, users) = (self.building.recs.len(), self.building.users.len());
        let mut c = std::mem::replace(
            &mut self.building,
            Chunk {
                recs: Vec::with_capacity(recs + recs / 8),
                users: Vec::with_capacity(users + users / 8),
                ..Chunk::default()
            },
        );
        // Held until the checkpoint's segment: at most 1/4 of growth slack (12 B per
        // click); a larger one (a batch much smaller than the last) is given back.
        if c.recs.capacity() > c.recs.len() + c.recs.len() / 4 {
            c.recs.shrink_to_fit();
        }
        if c.users.capacity() > c.users.len() + c.users.len() / 4 {
            c.users.shrink_to_fit();
        }
        // The IP as a big-endian integer: its bytes' order. LSD radix sort, which skips
        // the bytes every key shares (a batch of IPv4 clicks, all with an IP, sorts in 4
        // passes, not 17; unknown IPs add the flag's and a few more): a
        // comparison sort of the 48-byte records was ~4% of the apply path.
        radsort::sort_by_key(&mut c.recs, |r| (!r.has_ip, u128::from_be_bytes(r.ip)));
        c.with_ip = c.recs.partition_point(|r| r.has_ip);
        c.min_minute = c.recs.iter().map(|r| r.minute).min().unwrap_or(0);
        c.max_minute = c.recs.iter().map(|r| r.minute).max().unwrap_or(0);
        // By user id bytes: radix-sorted by their first 8 bytes as one integer (the order
        // of the bytes, zero-padded), then each run of equal prefixes by the bytes
        // themselves (a `memcmp` per compare of a comparison sort was 7% of the apply path).
        let mut by_user: Vec<(u64, u32)> = (0..c.recs.len() as u32)
            .filter(|&i| c.recs[i as usize].user_len > 0)
            .map(|i| (user_prefix(c.user(&c.recs[i as usize])), i))
            .collect();
        radsort::sort_by_key(&mut by_user, |&(prefix, _)| prefix);
        for run in by_user.chunk_by_mut(|a, b| a.0 == b.0) {
            if run.len() > 1 {
                run.sort_unstable_by(|a, b| {
                    c.user(&c.recs[a.1 as usize])
                        .cmp(c.user(&c.recs[b.1 as usize]))
                });
            }
        }
        c.by_user = Vec::with_capacity(by_user.len());
        c.by_user.extend(by_user.iter().map(|&(_, i)| i));
        let mut parts = lock(&self.parts);
        parts.chunk_bytes += c.heap_bytes();
        parts.chunks.push(Arc::new(c));
        parts.publish(&self.shared);
    }

    /// Whether a flush is being written.
    pub fn flushing(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Heap bytes of the chunks in RAM (published, not yet replaced by a segment), those
    /// of a flush being written included. The engine flushes early above
    /// `click_index.memory_bytes`.
    pub fn ram_bytes(&self) -> usize {
        lock(&self.parts).chunk_bytes
    }

    /// Starts writing the chunks so far as one segment covering WAL positions up to
    /// `upto` (the checkpoint about to be saved), on a thread of its own. Its chunks stay
    /// in RAM, published, until the segment replaces them. `false`: a flush is already
    /// running (take the checkpoint later).
    pub fn start_flush(&mut self, upto: u64) -> bool {
        if self.in_flight.is_some() {
            return false;
        }
        self.end_batch();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let chunks: Vec<Arc<Chunk>> = lock(&self.parts).chunks.iter().cloned().collect();
        if chunks.is_empty() || upto <= self.flushed_pos {
            let _ = tx.send(Ok(()));
        } else if fail_flushes_in(&self.dir) {
            let _ = tx.send(Err(SegmentError::io(
                &self.dir,
                std::io::Error::other("injected flush failure"),
            )));
        } else {
            let path = self.dir.join(segment::name(self.flushed_pos, upto));
            let (from, parts, shared) = (self.flushed_pos, self.parts.clone(), self.shared.clone());
            let spawned = std::thread::Builder::new()
                .name("adclick-index-flush".into())
                .spawn(move || {
                    crate::lower_thread_priority(crate::BACKGROUND_NICE, "click-index flush");
                    let _ = tx.send(write_segment(&path, from, upto, &chunks, &parts, &shared));
                });
            if let Err(e) = spawned {
                let (tx, again) = std::sync::mpsc::sync_channel(1);
                let _ = tx.send(Err(SegmentError::io(&self.dir, e)));
                self.in_flight = Some(InFlight { upto, done: again });
                return true;
            }
        }
        self.in_flight = Some(InFlight { upto, done: rx });
        true
    }

    /// The outcome of the running flush once it is done (waiting for it with `wait`):
    /// `Some(Ok(upto))` when the segments now cover WAL positions up to `upto`.
    pub fn finish_flush(&mut self, wait: bool) -> Option<Result<u64, SegmentError>> {
        let f = self.in_flight.as_ref()?;
        let out = if wait {
            f.done.recv().unwrap_or_else(|_| {
                Err(SegmentError::io(
                    &self.dir,
                    std::io::Error::other("flusher stopped"),
                ))
            })
        } else {
            match f.done.try_recv() {
                Ok(r) => r,
                Err(std::sync::mpsc::TryRecvError::Empty) => return None,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => Err(SegmentError::io(
                    &self.dir,
                    std::io::Error::other("flusher stopped"),
                )),
            }
        };
        let upto = f.upto;
        self.in_flight = None;
        Some(out.map(|()| {
            self.flushed_pos = self.flushed_pos.max(upto);
            upto
        }))
    }

    /// Writes the chunks so far as a segment up to `upto` and waits for it (benchmarks,
    /// tests; the engine overlaps the write with ingest).
    pub fn flush(&mut self, upto: u64) -> Result<(), SegmentError> {
        if let Some(r) = self.finish_flush(true) {
            r?;
        }
        self.start_flush(upto);
        self.finish_flush(true).unwrap_or(Ok(upto)).map(|_| ())
    }

    /// Deletes segments whose newest minute is before `oldest_minute` (nothing a valid
    /// query can reach). Returns how many were deleted.
    pub fn expire(&mut self, oldest_minute: u32) -> usize {
        let old: Vec<Arc<Segment>> = {
            let mut parts = lock(&self.parts);
            let (old, keep): (Vec<_>, Vec<_>) = parts
                .segments
                .iter()
                .cloned()
                .partition(|s| s.max_minute() < oldest_minute);
            if old.is_empty() {
                return 0;
            }
            parts.segments = Arc::new(keep);
            parts.publish(&self.shared);
            old
        };
        for s in &old {
            if let Err(e) = std::fs::remove_file(s.path()) {
                tracing::warn!(file = %s.path().display(), error = %e, "cannot delete an expired click index segment");
            }
        }
        old.len()
    }

    /// Bytes of the segments on disk.
    pub fn disk_bytes(&self) -> u64 {
        lock(&self.parts).segments.iter().map(|s| s.len()).sum()
    }
}

/// Test hook: flushes of indexes in these directories fail (as a full disk would), so a
/// test can check that a checkpoint is never saved without its segment. Keyed by
/// directory so that tests running in parallel do not see each other's failures.
pub static FAIL_FLUSHES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn fail_flushes_in(dir: &Path) -> bool {
    FAIL_FLUSHES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|d| dir.starts_with(d))
}

/// The flusher's work: the segment of `chunks`, then, under the lock, the segment in and
/// those chunks (the oldest ones) out of what queries see.
fn write_segment(
    path: &Path,
    from: u64,
    upto: u64,
    chunks: &[Arc<Chunk>],
    parts: &Locked,
    shared: &Shared,
) -> Result<(), SegmentError> {
    let n: usize = chunks.iter().map(|c| c.recs.len()).sum();
    let clicks = chunks.iter().flat_map(|c| {
        c.recs.iter().map(move |r| segment::Click {
            ip: r.has_ip.then_some(r.ip),
            user: c.user(r),
            minute: r.minute,
            ad: r.ad,
            combo: r.combo,
        })
    });
    let t = std::time::Instant::now();
    let seg = Arc::new(segment::write(path, from, upto, clicks, n)?);
    tracing::debug!(
        clicks = n,
        from,
        upto,
        write_ms = t.elapsed().as_millis() as u64,
        "click index segment written"
    );
    let mut p = lock(parts);
    let mut segments = Vec::clone(&p.segments);
    segments.push(seg);
    p.segments = Arc::new(segments);
    debug_assert!(p.chunks.iter().zip(chunks).all(|(a, b)| Arc::ptr_eq(a, b)));
    p.chunks.drop_first(chunks.len());
    let freed: usize = chunks.iter().map(|c| c.heap_bytes()).sum();
    p.chunk_bytes = p.chunk_bytes.saturating_sub(freed);
    p.publish(shared);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::strategy::Strategy;

    proptest::proptest! {
        /// Sorting by the prefix, then the bytes, is byte order (what `Chunk::scan`'s
        /// binary search by user assumes), zero bytes and shared prefixes included.
        #[test]
        fn user_prefix_order_is_byte_order(
            a in proptest::collection::vec(proptest::prop_oneof![proptest::strategy::Just(0u8), proptest::strategy::Just(b'u'), proptest::arbitrary::any::<u8>()], 0..12),
            b in proptest::collection::vec(proptest::prop_oneof![proptest::strategy::Just(0u8), proptest::strategy::Just(b'u'), proptest::arbitrary::any::<u8>()], 0..12),
        ) {
            let by_prefix = user_prefix(&a).cmp(&user_prefix(&b)).then_with(|| a.cmp(&b));
            proptest::prop_assert_eq!(by_prefix, a.cmp(&b));
        }

        /// A batch's chunk holds every click pushed, by IP (clicks with one first, then
        /// the IP's bytes) and by user id bytes, whatever the mix of IPv4, IPv6, unknown
        /// IPs and user ids sharing 8-byte prefixes (the radix sorts' skipped bytes and
        /// tie runs): checked against a comparison sort of the pushed values.
        #[test]
        fn a_chunk_is_sorted_by_ip_and_by_user(
            clicks in proptest::collection::vec((
                proptest::prop_oneof![
                    proptest::collection::vec(proptest::arbitrary::any::<u8>(), 4),
                    proptest::collection::vec(proptest::arbitrary::any::<u8>(), 16),
                    proptest::collection::vec(0u8..2, 4),
                    proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..3),
                ],
                proptest::prop_oneof![
                    proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..12),
                    "user-0[0-9]{0,4}".prop_map(String::into_bytes),
                    proptest::collection::vec(0u8..2, 0..10),
                ],
            ), 1..300),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (mut w, _) = IndexWriter::open(dir.path(), 0).unwrap();
            for (i, (ip, user)) in clicks.iter().enumerate() {
                w.push(i as u64, 60_000, 0, ip, user);
            }
            w.end_batch();
            let parts = lock(&w.parts);
            let chunk = parts.chunks.iter().next().unwrap();
            let mut want_ips: Vec<(bool, Ip)> = clicks
                .iter()
                .map(|(ip, _)| ip_key(ip).map_or((true, [0; 16]), |k| (false, k)))
                .collect();
            want_ips.sort_unstable();
            let got_ips: Vec<(bool, Ip)> = chunk.recs.iter().map(|r| (!r.has_ip, r.ip)).collect();
            proptest::prop_assert_eq!(got_ips, want_ips);
            proptest::prop_assert_eq!(chunk.with_ip, clicks.iter().filter(|(ip, _)| ip_key(ip).is_some()).count());
            // Each record kept its own user id and ad through the sort.
            for r in &chunk.recs {
                proptest::prop_assert_eq!(chunk.user(r), &clicks[r.ad as usize].1[..]);
            }
            let mut want_users: Vec<&[u8]> = clicks.iter().map(|(_, u)| &u[..]).filter(|u| !u.is_empty()).collect();
            want_users.sort_unstable();
            let got_users: Vec<&[u8]> = chunk.by_user.iter().map(|&i| chunk.user(&chunk.recs[i as usize])).collect();
            proptest::prop_assert_eq!(got_users, want_users);
        }

        /// The chunk list holds the chunks pushed and not yet dropped, oldest first,
        /// whatever the cuts (inside a block, at its edge, in the tail, past the end), and
        /// a clone taken earlier (a published snapshot) never changes.
        #[test]
        fn chunk_lists_match_a_vec(ops in proptest::collection::vec((0u8..4, 0usize..400), 0..60)) {
            let (mut list, mut model, mut next) = (ChunkList::default(), Vec::new(), 0u32);
            for (op, n) in ops {
                if op == 0 {
                    list.drop_first(n);
                    model.drain(..n.min(model.len()));
                } else {
                    for _ in 0..n {
                        let c = Arc::new(Chunk { min_minute: next, ..Chunk::default() });
                        list.push(c);
                        model.push(next);
                        next += 1;
                    }
                }
                let before = list.clone();
                let seen: Vec<u32> = list.iter().map(|c| c.min_minute).collect();
                proptest::prop_assert_eq!(&seen, &model);
                proptest::prop_assert!(list.tail.len() < BLOCK);
                list.push(Arc::new(Chunk::default()));
                list.drop_first(1);
                let kept: Vec<u32> = before.iter().map(|c| c.min_minute).collect();
                proptest::prop_assert_eq!(&kept, &model);
                list = before;
            }
        }
    }

    /// The measurement behind the choice of segments over a B-tree (ARCHITECTURE.md,
    /// "Click index"): the same 2.4M clicks (30 s at 80k/s: random IPs and users) indexed
    /// (a) as RAM chunks of 1,000 flushed into one segment, and (b) as rows of a redb table
    /// keyed (ip, minute, ad, combo, user), one write transaction per 64 batches (the
    /// writer's group commit). Run:
    /// `cargo test --release -p adclick-aggregator --lib clickindex::tests::segments_vs_redb -- --ignored --nocapture`
    #[test]
    #[ignore = "measurement, run by hand"]
    fn segments_vs_redb() {
        const N: u64 = 2_400_000;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let clicks: Vec<([u8; 4], String, u64)> = (0..N)
            .map(|_| {
                let ip = ((next() % (1 << 24)) as u32 | 10 << 24).to_be_bytes();
                (
                    ip,
                    format!("user-{}", next() % 1_000_000),
                    1 + next() % 1_000_000,
                )
            })
            .collect();
        let minute = |i: u64| T0_MIN * 60_000 + (i * 1000 / 80_000) as i64;
        const T0_MIN: i64 = 29_453_760;

        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = IndexWriter::open(dir.path(), 0).unwrap();
        let t = std::time::Instant::now();
        for (i, (ip, user, ad)) in clicks.iter().enumerate() {
            w.push(*ad, minute(i as u64), 1, ip, user.as_bytes());
            if i % 1000 == 999 {
                w.end_batch();
            }
        }
        let push = t.elapsed();
        w.flush(1).unwrap();
        let seg = t.elapsed();
        println!(
            "segments: push {:.0} ns/click, push + one flush {:.2} s = {:.0} clicks/s, {} bytes",
            push.as_nanos() as f64 / N as f64,
            seg.as_secs_f64(),
            N as f64 / seg.as_secs_f64(),
            w.disk_bytes()
        );

        const T: redb::TableDefinition<'static, &[u8], u32> = redb::TableDefinition::new("ip");
        let db = redb::Database::builder()
            .set_cache_size(64 << 20)
            .create(dir.path().join("cmp.redb"))
            .unwrap();
        let t = std::time::Instant::now();
        for (g, group) in clicks.chunks(64_000).enumerate() {
            let tx = db.begin_write().unwrap();
            {
                let mut table = tx.open_table(T).unwrap();
                for (i, (ip, user, ad)) in group.iter().enumerate() {
                    let mut k = Vec::with_capacity(64);
                    k.extend_from_slice(&ip_key(ip).unwrap());
                    k.extend_from_slice(
                        &((minute((g * 64_000 + i) as u64) / 60_000) as u32).to_be_bytes(),
                    );
                    k.extend_from_slice(&ad.to_be_bytes());
                    k.extend_from_slice(&1u32.to_be_bytes());
                    k.extend_from_slice(user.as_bytes());
                    let old = table
                        .insert(k.as_slice(), 1)
                        .unwrap()
                        .map_or(0, |v| v.value());
                    if old > 0 {
                        table.insert(k.as_slice(), old + 1).unwrap();
                    }
                }
            }
            tx.commit().unwrap();
        }
        let redb_t = t.elapsed();
        let size = std::fs::metadata(dir.path().join("cmp.redb"))
            .unwrap()
            .len();
        println!(
            "redb (ip table only, no user table): {:.2} s = {:.0} clicks/s, {} bytes",
            redb_t.as_secs_f64(),
            N as f64 / redb_t.as_secs_f64(),
            size
        );
    }
}

/// Directory of the invalid lane inside [`DIR`].
pub const INVALID_DIR: &str = "invalid";

/// The click index's two lanes (issue 16): `all` holds every counted click, `invalid` the
/// clicks the rules classified invalid — on arrival, and when a rule moves them later (a
/// move appends; nothing is removed). So, as in the cells, valid = all − invalid for any
/// probe, and a retroactive move changes the answer the way it changes the cells'. Both
/// lanes flush for the same checkpoint position and expire together; a checkpoint waits
/// for both segments.
#[derive(Debug)]
pub struct Lanes {
    /// Every counted click.
    pub all: IndexWriter,
    /// The invalid ones.
    pub invalid: IndexWriter,
    /// A lane's flush outcome, kept until the other's is in too.
    done: [Option<Result<u64, SegmentError>>; 2],
}

impl Lanes {
    /// Opens both lanes under `dir` (see [`IndexWriter::open`]); returns their snapshots
    /// (all, invalid).
    #[allow(clippy::type_complexity)]
    pub fn open(dir: &Path, cp_pos: u64) -> Result<(Self, Arc<Shared>, Arc<Shared>), SegmentError> {
        let (all, all_shared) = IndexWriter::open(dir, cp_pos)?;
        let (invalid, invalid_shared) = IndexWriter::open(&dir.join(INVALID_DIR), cp_pos)?;
        Ok((
            Lanes {
                all,
                invalid,
                done: [None, None],
            },
            all_shared,
            invalid_shared,
        ))
    }

    /// [`IndexWriter::set_ip_storage`] on both lanes.
    pub fn set_ip_storage(&mut self, masker: Arc<IpMasker>) {
        self.all.set_ip_storage(masker.clone());
        self.invalid.set_ip_storage(masker);
    }

    /// Ends the batch in both lanes.
    pub fn end_batch(&mut self) {
        self.all.end_batch();
        self.invalid.end_batch();
    }

    /// Whether a flush is being written (in either lane).
    pub fn flushing(&self) -> bool {
        self.all.flushing() || self.invalid.flushing() || self.done.iter().any(Option::is_some)
    }

    /// Starts both lanes' flushes up to `upto`.
    pub fn start_flush(&mut self, upto: u64) -> bool {
        if self.flushing() {
            return false;
        }
        self.all.start_flush(upto);
        self.invalid.start_flush(upto);
        true
    }

    /// Both lanes' outcome once both are done: the first error, else `upto`.
    pub fn finish_flush(&mut self, wait: bool) -> Option<Result<u64, SegmentError>> {
        for (slot, lane) in self.done.iter_mut().zip([&mut self.all, &mut self.invalid]) {
            if slot.is_none() {
                *slot = lane.finish_flush(wait);
            }
        }
        if self.done.iter().any(Option::is_none) {
            return None;
        }
        let [a, b] = std::mem::take(&mut self.done);
        Some(match (a?, b?) {
            (Err(e), _) | (_, Err(e)) => Err(e),
            (Ok(x), Ok(y)) => Ok(x.min(y)),
        })
    }

    /// Writes both lanes' chunks so far up to `upto` and waits (benchmarks, tests).
    pub fn flush(&mut self, upto: u64) -> Result<(), SegmentError> {
        self.all.flush(upto)?;
        self.invalid.flush(upto)
    }

    /// Deletes both lanes' segments before `oldest_minute`; how many.
    pub fn expire(&mut self, oldest_minute: u32) -> usize {
        self.all.expire(oldest_minute) + self.invalid.expire(oldest_minute)
    }

    /// Bytes of both lanes' segments on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.all.disk_bytes() + self.invalid.disk_bytes()
    }

    /// Heap bytes of both lanes' chunks in RAM ([`IndexWriter::ram_bytes`]).
    pub fn ram_bytes(&self) -> usize {
        self.all.ram_bytes() + self.invalid.ram_bytes()
    }
}
