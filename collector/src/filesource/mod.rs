//! `[[source.file]]`: clicks that ad servers append to log files, one JSON click per line
//! (the fields of the HTTP JSON ingest, `token` included, plus an optional `client_ip`
//! and `user_agent`, the visitor's header, classified like an HTTP request's),
//! tailed like Vector's file source and fed through the same click path as HTTP
//! (verification, dedup, quarantine, spool).
//!
//! - **Which files:** every poll, each `paths` glob is expanded. A file is known by its
//!   *fingerprint* (a hash of its first line), not its name or inode: a renamed file keeps
//!   its fingerprint, a copy made by copytruncate has its original's, and a file truncated
//!   in place gets a new one once its new first line is complete. A fingerprint is read by
//!   one open file at a time.
//! - **Rotation:** rename — the open file is drained to its end through the open handle
//!   (for `rotate_wait_ms` after its path stopped matching), the new file at the path is a
//!   new fingerprint read from its start; copytruncate — the truncation is seen (size below
//!   the offset), the file starts over at 0 with its new first line, and the copy, if a glob
//!   matches it, continues from the offset reached (so lines written between the last read
//!   and the copy are not lost). Lines appended to a file between the copy and the
//!   truncation are lost by copytruncate itself, as with every tailer.
//! - **Positions, exactly once:** per fingerprint the offset after the last line whose
//!   clicks are in the spool, kept in `<data_dir>/file-source/<name>.pos` (two CRC'd
//!   slots, `checkpoint.rs`). A batch of lines is committed to the spool together with a
//!   *marker* (an extra protobuf field, number [`MARKER_FIELD`], in the record: source,
//!   fingerprint, offset after the batch; readers of the record skip it), and the source
//!   pins the spool (`SourcePin`: the forwarder does not ack, hence never deletes, records
//!   from that seq on) until the position file holding the batch's offset is durable. A
//!   restart takes the position file, then the markers of the spool records after the
//!   seq it names: a crash between the spool commit and the position write cannot make it
//!   read a line again, and a crash before the commit reads the batch again (it was never
//!   acknowledged anywhere). Lines that produce no accepted click (all malformed or
//!   refused) move the position without a spool record.
//! - **Malformed lines** are counted by reason (`adclick_collector_file_lines_total`
//!   {source, outcome}) and skipped; clicks refused by verification are quarantined and
//!   counted like HTTP's. A partial last line waits until its newline arrives.

mod checkpoint;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use checkpoint::{FilePos, Positions, PositionsFile};

use crate::config::FileSourceConfig;
use crate::http::HttpState;
use crate::ingest::{Processed, RequestCtx};
use crate::spool::Spool;

/// Protobuf field number of a file-source marker in a spool record (the records are
/// `IngestBatch` field-3 clicks; readers skip unknown fields).
pub const MARKER_FIELD: u32 = 100;

/// The spool seqs the forwarder must not ack yet, one slot per file source (`u64::MAX`:
/// none): a source holds its slot from before its commit until its position file covers
/// the committed record. Cloned into the forwarder, which acks at most below the lowest.
#[derive(Debug, Clone)]
pub struct SourcePins(Arc<Vec<AtomicU64>>);

impl SourcePins {
    /// `n` slots, none held.
    pub fn new(n: usize) -> Self {
        SourcePins(Arc::new((0..n).map(|_| AtomicU64::new(u64::MAX)).collect()))
    }

    /// The highest seq that may be acked now, given the forwarder wants `want`.
    pub fn clamp(&self, want: u64) -> u64 {
        self.0.iter().fold(want, |w, p| {
            w.min(p.load(Ordering::Acquire).saturating_sub(1))
        })
    }

    fn slot(&self, i: usize) -> SourcePin {
        SourcePin {
            pins: self.clone(),
            i,
        }
    }
}

/// One source's slot of [`SourcePins`].
#[derive(Debug, Clone)]
pub struct SourcePin {
    pins: SourcePins,
    i: usize,
}

impl SourcePin {
    fn hold(&self, from: u64) {
        if let Some(p) = self.pins.0.get(self.i) {
            p.store(from, Ordering::Release);
        }
    }
    fn release(&self) {
        if let Some(p) = self.pins.0.get(self.i) {
            p.store(u64::MAX, Ordering::Release);
        }
    }
}

/// Encodes a marker: `source` read `fingerprint` up to `offset`.
pub fn encode_marker(source: &str, fingerprint: u64, offset: u64, out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(source.len() + 24);
    prost::encoding::encode_varint(source.len() as u64, &mut body);
    body.extend_from_slice(source.as_bytes());
    body.extend_from_slice(&fingerprint.to_le_bytes());
    body.extend_from_slice(&offset.to_le_bytes());
    prost::encoding::encode_key(
        MARKER_FIELD,
        prost::encoding::WireType::LengthDelimited,
        out,
    );
    prost::encoding::encode_varint(body.len() as u64, out);
    out.extend_from_slice(&body);
}

/// The markers of a spool record's payload: (source, fingerprint, offset).
pub fn markers(mut payload: &[u8]) -> Vec<(String, u64, u64)> {
    use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
    let mut out = Vec::new();
    while !payload.is_empty() {
        let Ok((tag, wire)) = decode_key(&mut payload) else {
            break;
        };
        if tag == MARKER_FIELD && wire == WireType::LengthDelimited {
            let Ok(len) = decode_varint(&mut payload) else {
                break;
            };
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > payload.len() {
                break;
            }
            let (mut body, rest) = payload.split_at(len);
            payload = rest;
            let Ok(n) = decode_varint(&mut body) else {
                continue;
            };
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if body.len() != n.saturating_add(16) {
                continue;
            }
            let name = String::from_utf8_lossy(&body[..n]).into_owned();
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[n..n + 8]);
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[n + 8..]);
            out.push((name, u64::from_le_bytes(a), u64::from_le_bytes(b)));
        } else if skip_field(wire, tag, &mut payload, DecodeContext::default()).is_err() {
            break;
        }
    }
    out
}

/// Fingerprint of a file: XXH64 of its first line (newline included).
fn fingerprint(first_line: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(first_line, 0x6164_636c_6963_6b21)
}

/// Why a line was skipped (the `outcome` label), or `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineOutcome {
    /// Parsed into a click (which verification may still refuse).
    Read,
    /// Not a JSON object of the click fields.
    InvalidJson,
    /// A field with a value the ingest does not accept (device, client_ip).
    InvalidField,
    /// Longer than `max_line_bytes` (skipped up to its newline).
    TooLong,
}

impl LineOutcome {
    /// The label.
    pub fn label(self) -> &'static str {
        match self {
            LineOutcome::Read => "read",
            LineOutcome::InvalidJson => "invalid_json",
            LineOutcome::InvalidField => "invalid_field",
            LineOutcome::TooLong => "too_long",
        }
    }
}

/// An open, tracked file.
#[derive(Debug)]
struct Tracked {
    path: PathBuf,
    file: File,
    ino: (u64, u64),
    /// `None` until its first line is complete.
    fp: Option<u64>,
    offset: u64,
    /// When its path last matched a glob (or still points at it).
    matched: Instant,
    /// Skipping the rest of a too-long line.
    skipping: bool,
}

/// Lines waiting to be committed: the clicks, and the positions they reach.
#[derive(Debug, Default)]
struct Pending {
    processed: Processed,
    lines: u64,
    /// (fingerprint, offset after the last line) per file touched, in order.
    reached: Vec<(usize, u64, u64)>,
}

/// One running `[[source.file]]`.
#[derive(Debug)]
pub struct FileSource {
    cfg: FileSourceConfig,
    state: Arc<HttpState>,
    spool: Arc<Mutex<Spool>>,
    pin: SourcePin,
    store: PositionsFile,
    positions: Positions,
    files: Vec<Tracked>,
    rt: tokio::runtime::Handle,
    /// Lines read per outcome, mirrored into the metrics.
    pub lines: HashMap<&'static str, u64>,
}

fn now_ms() -> i64 {
    crate::http::now_ms()
}

impl FileSource {
    /// Opens the position file and catches up with the spool's markers.
    pub fn open(
        cfg: FileSourceConfig,
        data_dir: &Path,
        state: Arc<HttpState>,
        spool: Arc<Mutex<Spool>>,
        pin: SourcePin,
        rt: tokio::runtime::Handle,
    ) -> Result<FileSource, String> {
        let dir = data_dir.join("file-source");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let store = PositionsFile::new(dir.join(format!("{}.pos", cfg.name)));
        let mut positions = store.load()?;
        // Records committed after the position file was last written still hold their
        // markers (the pin kept them from being deleted).
        let mut from = positions.spool_seq + 1;
        let mut moved = 0;
        loop {
            let recs = {
                let s = spool.lock().unwrap_or_else(|e| e.into_inner());
                s.read(from, 256, 64 << 20).map_err(|e| e.to_string())?
            };
            let Some(last) = recs.last().map(|r| r.0) else {
                break;
            };
            for (seq, payload) in &recs {
                for (name, fp, off) in markers(payload) {
                    if name == cfg.name {
                        let e = positions.files.entry(fp).or_default();
                        if off > e.offset {
                            e.offset = off;
                            moved += 1;
                        }
                        positions.spool_seq = positions.spool_seq.max(*seq);
                    }
                }
            }
            from = last + 1;
        }
        if moved > 0 {
            tracing::info!(source = %cfg.name, moved, "file source: positions caught up from spool markers");
            store.save(&mut positions)?;
        }
        Ok(FileSource {
            cfg,
            state,
            spool,
            pin,
            store,
            positions,
            files: Vec::new(),
            rt,
            lines: HashMap::new(),
        })
    }

    /// Runs until `stop`.
    pub fn run(mut self, stop: &AtomicBool) {
        let poll = Duration::from_millis(self.cfg.poll_interval_ms.max(10));
        while !stop.load(Ordering::Acquire) {
            let busy = match self.poll_once(stop) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(source = %self.cfg.name, error = %e, "file source: poll failed; retrying");
                    false
                }
            };
            if !busy {
                std::thread::sleep(poll);
            }
        }
    }

    /// One pass: discover files, read what is new. Returns whether anything was read.
    pub fn poll_once(&mut self, stop: &AtomicBool) -> Result<bool, String> {
        self.discover();
        let mut any = false;
        for i in 0..self.files.len() {
            if stop.load(Ordering::Acquire) {
                break;
            }
            any |= self.read_file(i)?;
        }
        // Drop files drained after their path stopped matching (rename rotation).
        let wait = Duration::from_millis(self.cfg.rotate_wait_ms);
        self.files
            .retain(|t| t.matched.elapsed() < wait || !at_eof(t));
        Ok(any)
    }

    fn discover(&mut self) {
        let mut seen: Vec<PathBuf> = Vec::new();
        for pat in &self.cfg.paths {
            match glob::glob(pat) {
                Ok(paths) => seen.extend(paths.flatten()),
                Err(e) => {
                    tracing::error!(source = %self.cfg.name, pattern = %pat, error = %e, "file source: bad glob")
                }
            }
        }
        for path in seen {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let ino = (meta.dev(), meta.ino());
            if let Some(t) = self.files.iter_mut().find(|t| t.ino == ino) {
                t.path = path;
                t.matched = Instant::now();
                continue;
            }
            let Ok(file) = File::open(&path) else {
                continue;
            };
            self.files.push(Tracked {
                path,
                file,
                ino,
                fp: None,
                offset: 0,
                matched: Instant::now(),
                skipping: false,
            });
        }
        // A tracked file whose name now belongs to another file (renamed away) keeps its
        // `matched` time from before, so it drains for `rotate_wait_ms`.
    }

    /// Fingerprints file `i` if its first line is complete; `false` when it cannot start
    /// yet (no full first line, or its fingerprint is read by another open file).
    fn identify(&mut self, i: usize) -> Result<bool, String> {
        let t = &mut self.files[i];
        if t.fp.is_some() {
            return Ok(true);
        }
        let mut first = Vec::new();
        let mut buf = [0u8; 4096];
        t.file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        loop {
            let n = t.file.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(false);
            }
            if let Some(nl) = buf[..n].iter().position(|b| *b == b'\n') {
                first.extend_from_slice(&buf[..=nl]);
                break;
            }
            first.extend_from_slice(&buf[..n]);
            if first.len() > self.cfg.max_line_bytes {
                // Fingerprint by the prefix of a too-long first line.
                break;
            }
        }
        let fp = fingerprint(&first);
        if self.files.iter().any(|o| o.fp == Some(fp)) {
            // A copy of a file still open (copytruncate before the truncation): wait.
            return Ok(false);
        }
        let t = &mut self.files[i];
        t.fp = Some(fp);
        t.offset = self.positions.files.get(&fp).map_or(0, |p| p.offset);
        t.skipping = false;
        let e = self.positions.files.entry(fp).or_default();
        e.path = t.path.display().to_string();
        e.seen_ms = now_ms();
        Ok(true)
    }

    fn read_file(&mut self, i: usize) -> Result<bool, String> {
        // Truncated in place (copytruncate): start over with a new fingerprint.
        let len = self.files[i]
            .file
            .metadata()
            .map_err(|e| e.to_string())?
            .len();
        if self.files[i].fp.is_some() && len < self.files[i].offset {
            let t = &mut self.files[i];
            tracing::info!(source = %self.cfg.name, path = %t.path.display(), "file source: file truncated; reading it from the start");
            t.fp = None;
            t.offset = 0;
        }
        if !self.identify(i)? {
            return Ok(false);
        }
        let mut any = false;
        let chunk = self.cfg.max_line_bytes.clamp(64 << 10, 4 << 20);
        let mut buf = vec![0u8; chunk];
        loop {
            let t = &mut self.files[i];
            t.file
                .seek(SeekFrom::Start(t.offset))
                .map_err(|e| e.to_string())?;
            let n = t.file.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(any);
            }
            let data = &buf[..n];
            let fp = t.fp.unwrap_or(0);
            let mut pending = Pending::default();
            let mut pos = 0usize;
            let received = now_ms();
            while pending.lines < self.cfg.batch_lines as u64 {
                let Some(nl) = data[pos..].iter().position(|b| *b == b'\n') else {
                    break;
                };
                let line = &data[pos..pos + nl];
                pos += nl + 1;
                let t = &mut self.files[i];
                if t.skipping {
                    // The end of a too-long line.
                    t.skipping = false;
                    continue;
                }
                self.line(line, received, &mut pending);
            }
            if pos == 0 {
                // No complete line in the chunk.
                if n == buf.len() {
                    // A line longer than the chunk: skip to its end.
                    if !self.files[i].skipping {
                        self.files[i].skipping = true;
                        self.count(LineOutcome::TooLong);
                    }
                    let off = self.files[i].offset + n as u64;
                    pending.reached.push((i, fp, off));
                    self.commit(pending)?;
                    any = true;
                    continue;
                }
                return Ok(any);
            }
            let off = self.files[i].offset + pos as u64;
            pending.reached.push((i, fp, off));
            self.commit(pending)?;
            any = true;
        }
    }

    fn count(&mut self, o: LineOutcome) {
        *self.lines.entry(o.label()).or_default() += 1;
        self.state
            .metrics
            .file_lines
            .get_or_create(&crate::metrics::FileLineLabel {
                source: self.cfg.name.clone(),
                outcome: o.label(),
            })
            .inc();
    }

    fn line(&mut self, line: &[u8], received: i64, pending: &mut Pending) {
        pending.lines += 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        if line.len() > self.cfg.max_line_bytes {
            self.count(LineOutcome::TooLong);
            return;
        }
        match crate::http::json::parse_line(line, received) {
            Ok(crate::http::json::Line {
                click,
                client_ip: ip,
                user_agent,
            }) => {
                self.count(LineOutcome::Read);
                let ctx = RequestCtx {
                    received_at_ms: received,
                    client_ip: ip,
                    ua_class: self
                        .state
                        .user_agents
                        .classify(user_agent.as_deref().map(str::as_bytes)),
                };
                let mut p = self
                    .state
                    .processor
                    .process(&[crate::ingest::ClickRef::from(&click)], &ctx);
                let rejected = std::mem::take(&mut p.rejected);
                if !rejected.is_empty() {
                    self.state.quarantine.record(received, ip, rejected);
                }
                pending.processed.append(p);
            }
            Err(o) => self.count(o),
        }
    }

    /// Makes the pending clicks durable with their marker, then the positions.
    fn commit(&mut self, pending: Pending) -> Result<(), String> {
        let Pending {
            processed, reached, ..
        } = pending;
        let mut seq = None;
        if processed.accepted() > 0 {
            let mut encoded = processed.encoded().to_vec();
            for (_, fp, off) in &reached {
                encode_marker(&self.cfg.name, *fp, *off, &mut encoded);
            }
            let durable = self
                .spool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .durable_seq();
            // Every record from here on stays until the positions cover ours.
            self.pin.hold(durable + 1);
            let n = processed.accepted();
            let committer = self.state.committer.clone();
            let mut backoff = Duration::from_millis(50);
            loop {
                match self.rt.block_on(committer.commit(encoded.clone(), n)) {
                    Ok(s) => {
                        self.state.processor.committed(&processed);
                        seq = Some(s);
                        break;
                    }
                    Err(e) => {
                        // The spool is failing (disk): nothing was acknowledged; retry
                        // the same lines (the position has not moved).
                        tracing::warn!(source = %self.cfg.name, error = %e, "file source: spool commit failed; retrying");
                        self.state.metrics.add_clicks("spool_unavailable", n as u64);
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        for (i, fp, off) in reached {
            self.files[i].offset = off;
            let e = self.positions.files.entry(fp).or_default();
            e.offset = off;
            e.path = self.files[i].path.display().to_string();
            e.seen_ms = now_ms();
        }
        if let Some(s) = seq {
            self.positions.spool_seq = self.positions.spool_seq.max(s);
        }
        let saved = self.store.save(&mut self.positions);
        self.pin.release();
        saved
    }
}

fn at_eof(t: &Tracked) -> bool {
    t.file.metadata().map_or(true, |m| m.len() <= t.offset)
}

/// Starts every configured file source on its own thread (`pins`: one slot each).
pub fn start(
    cfgs: &[FileSourceConfig],
    data_dir: &Path,
    state: Arc<HttpState>,
    spool: Arc<Mutex<Spool>>,
    pins: &SourcePins,
) -> Result<FileSources, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (i, c) in cfgs.iter().enumerate() {
        let src = FileSource::open(
            c.clone(),
            data_dir,
            state.clone(),
            spool.clone(),
            pins.slot(i),
            tokio::runtime::Handle::current(),
        )?;
        let st = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("adclick-file-{}", c.name))
                .spawn(move || src.run(&st))
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(FileSources { stop, threads })
}

/// The running file sources.
#[derive(Debug)]
pub struct FileSources {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FileSources {
    /// Stops them (each finishes the batch it is committing) and waits.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Prunes positions of files not seen for a day (called on save).
pub(crate) fn prune(files: &mut BTreeMap<u64, FilePos>, now: i64) {
    files.retain(|_, p| now.saturating_sub(p.seen_ms) < 24 * 3_600_000);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_among_clicks() {
        let mut payload = Vec::new();
        let c = adclick_proto::v1::IngestClick {
            ad_id: 7,
            ..Default::default()
        };
        prost::encoding::message::encode(3, &c, &mut payload);
        encode_marker("adserver", 42, 1234, &mut payload);
        prost::encoding::message::encode(3, &c, &mut payload);
        encode_marker("other", 1, 2, &mut payload);
        assert_eq!(
            markers(&payload),
            vec![("adserver".into(), 42, 1234), ("other".into(), 1, 2)]
        );
        // The clicks still decode as an IngestBatch (the marker is skipped).
        let b =
            <adclick_proto::v1::IngestBatch as prost::Message>::decode(payload.as_slice()).unwrap();
        assert_eq!(b.clicks.len(), 2);
    }

    #[test]
    fn the_pins_hold_acks_below_the_lowest() {
        let pins = SourcePins::new(2);
        let (a, b) = (pins.slot(0), pins.slot(1));
        assert_eq!(pins.clamp(10), 10);
        a.hold(5);
        b.hold(8);
        assert_eq!(pins.clamp(10), 4);
        assert_eq!(pins.clamp(3), 3);
        a.release();
        assert_eq!(pins.clamp(10), 7);
        b.release();
        assert_eq!(pins.clamp(10), 10);
    }
}
